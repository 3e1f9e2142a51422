"""A guard over two detectors, calibrated jointly on a sample of benign traffic.

Each bundled detector's threshold flags about 5 % of its own held-out negatives, so a
guard that fires when either fires flags up to the sum on traffic both read (8.9 % of
clean test documents for `harmful_request` + `prompt_injection`, bench/detectors.py).
`acteng.calibrate_jointly` sets both thresholds on one benign sample so that the union
flags the target. This bench asks what that buys and costs on traffic the calibration
never saw.

Benign traffic, four sources none of the detectors was trained on: the Alpaca sample
(../shared/data/external), the harmless requests of the team's `harmful_requests` test
split, the harmless look-alikes of its `wrapped_requests` test split (a conversation
scored as the server scores it: every turn, the highest score counts) and the clean
documents of its `prompt_injection` test split. For each seed, a seeded half of every
source is the calibration sample and the other half is where false positives are
counted; harmful requests (AdvBench + JailbreakBench + HarmBench, the wrapped harmful
test requests) and injected test documents are never used to calibrate, only to count
what each guard still catches. Guards compared, each a union of two detectors:

- shipped: each detector at its bundled threshold;
- apart: each recalibrated alone on the sample at the target (`joint_cut` of one
  detector: `Detector.calibrated_on`'s flags); the shares add up;
- joint: `calibrate_jointly` on the sample at the target;
- by source: the same with the sample's sources as `groups`, so the union stays within
  the target on each kind of traffic, not only on the pooled sample.

The test splits serve here as a deployment's own traffic; nothing shipped is tuned on
them (the bundled files are unchanged).

    .venv/bin/python bench/joint_calibration.py [--target-fpr 0.05] [--seeds 5]
        [--first harmful_request,harmful_request_documents] [--scores FILE]

--scores FILE keeps every detector's scores there (read back if it exists), so a second
look at the same scores skips the half hour of scoring.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import acteng
from _common import save
from acteng.detectors import Detector, load_detector
from acteng.joint_calibration import joint_cut
from detectors import EXTERNAL, HARMFUL, conversation_scores, injection_test, read, wrapped_test

BENIGN = ("alpaca", "harmless_requests", "wrapped_harmless", "clean_documents")
POSITIVE = ("public_harmful", "wrapped_harmful", "injected_documents")


def all_scores(model: acteng.Model, det: Detector) -> dict[str, list[float]]:
    """`det`'s score of every benign and positive item, by source."""
    wrapped = wrapped_test()
    wrapped_harmful, wrapped_harmless = conversation_scores(model, det, wrapped)
    documents = injection_test()
    own = acteng.load_pairs("harmful_requests", split="test")
    return {
        "alpaca": det.score(model, read("harmless_alpaca_sample.jsonl")),
        "harmless_requests": det.score(model, [p.negative for p in own]),
        "wrapped_harmless": wrapped_harmless,
        "clean_documents": det.score(model, [r["negative"] for r in documents]),
        "public_harmful": det.score(model, [p for name in HARMFUL for p in read(name)]),
        "wrapped_harmful": wrapped_harmful,
        "injected_documents": det.score(model, [r["positive"] for r in documents]),
    }


def halves(sizes: dict[str, int], seed: int) -> dict[str, tuple[list[int], list[int]]]:
    """Per benign source, a seeded (calibration, evaluation) split of its items."""
    rng = random.Random(seed)
    out = {}
    for source in BENIGN:
        order = list(range(sizes[source]))
        rng.shuffle(order)
        middle = len(order) // 2
        out[source] = (sorted(order[:middle]), sorted(order[middle:]))
    return out


def flagged_share(
    scores: list[dict[str, list[float]]],
    thresholds: tuple[float, ...],
    source: str,
    rows: list[int],
) -> float:
    """Share of `rows` of `source` that any detector flags at its threshold."""
    hits = [any(s[source][i] > t for s, t in zip(scores, thresholds, strict=True)) for i in rows]
    return sum(hits) / len(hits)


def one_seed(scores: list[dict[str, list[float]]], seed: int, target: float) -> dict[str, Any]:
    split = halves({s: len(scores[0][s]) for s in BENIGN}, seed)
    sample = [[d[s][i] for s in BENIGN for i in split[s][0]] for d in scores]
    kinds = [s for s in BENIGN for _ in split[s][0]]
    guards = {
        "apart": tuple(joint_cut([row], target).thresholds[0] for row in sample),
        "joint": joint_cut(sample, target).thresholds,
        "by_source": joint_cut(sample, target, kinds).thresholds,
    }
    out: dict[str, Any] = {}
    for name, thresholds in guards.items():
        row = {s: flagged_share(scores, thresholds, s, split[s][1]) for s in BENIGN}
        row["all_benign"] = all_benign(row, {s: len(split[s][1]) for s in BENIGN})
        for source in POSITIVE:
            row[source] = flagged_share(scores, thresholds, source, range_of(scores, source))
        row["thresholds"] = list(thresholds)
        out[name] = row
    return out


def all_benign(row: dict[str, Any], sizes: dict[str, int]) -> float:
    """The share of every benign item flagged, from each source's share and size."""
    return sum(row[s] * sizes[s] for s in BENIGN) / sum(sizes.values())


def range_of(scores: list[dict[str, list[float]]], source: str) -> list[int]:
    return list(range(len(scores[0][source])))


def shipped(scores: list[dict[str, list[float]]], dets: list[Detector]) -> dict[str, Any]:
    thresholds = tuple(d.threshold for d in dets)
    row = {
        s: flagged_share(scores, thresholds, s, range_of(scores, s)) for s in (*BENIGN, *POSITIVE)
    }
    row["all_benign"] = all_benign(row, {s: len(scores[0][s]) for s in BENIGN})
    row["thresholds"] = list(thresholds)
    return row


def summary(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and range over seeds of every figure of every guard."""
    out: dict[str, Any] = {}
    for guard in seeds[0]:
        out[guard] = {}
        for key in (*BENIGN, "all_benign", *POSITIVE):
            values = [s[guard][key] for s in seeds]
            out[guard][key] = {
                "mean": round(statistics.fmean(values), 4),
                "min": round(min(values), 4),
                "max": round(max(values), 4),
            }
    return out


def show(label: str, row: dict[str, Any]) -> None:
    def cell(key: str) -> str:
        value = row[key]
        if isinstance(value, dict):
            return f"{value['mean']:6.1%} ({value['min']:.1%}-{value['max']:.1%})"
        return f"{value:6.1%}"

    keys = [k for k in (*BENIGN, "all_benign", *POSITIVE) if k in row]
    print(f"  {label:8s} " + "  ".join(f"{k} {cell(k)}" for k in keys), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target-fpr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--first",
        default="harmful_request,harmful_request_documents",
        help="detectors paired with prompt_injection, one guard each (comma-separated)",
    )
    parser.add_argument("--scores", help="keep the detectors' scores in this JSON file")
    args = parser.parse_args()
    if not EXTERNAL.is_dir():
        sys.exit(f"skipped: {EXTERNAL} not found (public benchmark data lives beside the repo)")
    model = acteng.load_model()
    names = [*args.first.split(","), "prompt_injection"]
    detectors = {name: load_detector(name, model=model) for name in names}
    cache = Path(args.scores) if args.scores else None
    scores = json.loads(cache.read_text()) if cache and cache.exists() else {}
    for name, det in detectors.items():
        if name not in scores:
            scores[name] = all_scores(model, det)
            if cache:
                cache.write_text(json.dumps(scores))
        print(f"scored {name}: " + ", ".join(f"{k} {len(v)}" for k, v in scores[name].items()))
    payload: dict[str, Any] = {"target_fpr": args.target_fpr, "seeds": args.seeds, "guards": {}}
    for first in args.first.split(","):
        pair = [scores[first], scores["prompt_injection"]]
        runs = [one_seed(pair, seed, args.target_fpr) for seed in range(args.seeds)]
        result = {"shipped": shipped(pair, [detectors[first], detectors["prompt_injection"]]),
                  **summary(runs), "per_seed": runs}  # fmt: skip
        payload["guards"][f"{first}+prompt_injection"] = result
        print(f"{first} + prompt_injection (benign: held-out halves; mean (range) of "
              f"{args.seeds} seeds; shipped: whole sets)")  # fmt: skip
        for label in ("shipped", "apart", "joint", "by_source"):
            show(label, result[label])
    print(f"written to {save('joint_calibration', payload)}")


if __name__ == "__main__":
    main()
