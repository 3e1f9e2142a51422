"""The honesty detector on true vs false statements, AUROC per layer (issue 4 report).

Trains a ``response`` detector per layer on the team's `honesty` pairs (honest vs
deceptive answers to the same question) and scores each statement of
../shared/data/external/facts_true_false.jsonl as the assistant's answer to a neutral
request ("State a fact."); a true statement should read as more honest. Reports, per
layer, AUROC on the team's held-out honesty pairs (used to choose the bundled layer) and
AUROC true-vs-false on the external facts (reported only). For context it also reports a
ceiling: a probe trained on half of the facts themselves (true vs false) and tested on the
other half, i.e. how linearly readable truth is at that layer of this model at all.

    .venv/bin/python bench/honesty.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import acteng
from _common import save
from acteng.detectors import train_detector
from detectors import auroc

EXTERNAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "external"
REQUEST = "State a fact."


def main() -> None:
    facts_file = EXTERNAL / "facts_true_false.jsonl"
    if not facts_file.is_file():
        sys.exit(f"skipped: {facts_file} not found (public benchmark data lives beside the repo)")
    facts = [json.loads(line) for line in facts_file.read_text().splitlines() if line.strip()]
    true = [(REQUEST, f["statement"]) for f in facts if f["label"] == 1]
    false = [(REQUEST, f["statement"]) for f in facts if f["label"] == 0]
    model = acteng.load_model()
    own = acteng.load_pairs("honesty", split="test")
    # ceiling probe: even-indexed facts train it, odd-indexed ones test it
    fact_pairs = [
        {"prompt": REQUEST, "positive": t[1], "negative": f[1]}
        for t, f in zip(true[::2], false[::2], strict=False)
    ]
    rows = []
    for layer in range(2, model.num_layers, 2):
        det = train_detector(model, "honesty", layers=[layer], region="response")
        own_auc = auroc(
            det.score(model, [(str(p.prompt), p.positive) for p in own]),
            det.score(model, [(str(p.prompt), p.negative) for p in own]),
        )
        facts_auc = auroc(det.score(model, true), det.score(model, false))
        ceiling = train_detector(
            model, fact_pairs, layers=[layer], region="response", negatives=false[1::2]
        )
        ceiling_auc = auroc(ceiling.score(model, true[1::2]), ceiling.score(model, false[1::2]))
        rows.append(
            {
                "layer": layer,
                "own_test_auroc": round(own_auc, 4),
                "facts_auroc": round(facts_auc, 4),
                "facts_probe_ceiling": round(ceiling_auc, 4),
            }
        )
        print(
            f"layer {layer:2d}  own held-out AUROC {own_auc:.3f}  facts AUROC {facts_auc:.3f}  "
            f"(probe trained on facts: {ceiling_auc:.3f})",
            flush=True,
        )
    print(f"written to {save('honesty', {'request': REQUEST, 'rows': rows})}")


if __name__ == "__main__":
    main()
