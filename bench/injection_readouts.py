"""Choosing the `prompt_injection` recipe's layers, L2 and pooling on a validation cut.

Research bench for issue 18. The recipe fits a token-level probe
(`acteng.train_token_detector`) on the train split of the team's `prompt_injection` pairs
plus, as clean text, every user turn of the `wrapped_requests` train split (a user's own
jailbreak framing is not an injected instruction). This script makes the recipe's choices
without the test split: it keeps out a validation cut of whole train documents (seeded
25 %, `validation_cut`, what the trainer calibrated on before it cross-fitted) and a seeded
quarter of the wrapped train items, records every token once, fits one probe per layer set
and L2, and per pooling reports on the cut:

- ``auroc`` (injected vs clean documents) and ``injected_flagged`` at the threshold that
  flags 5 % of the cut's clean documents (what the recipe would ship with on documents
  like these);
- ``wrapped_flagged``: the share of held-out wrapped conversations (either side, highest
  turn, as the guard scores them) flagged at that threshold.

    .venv/bin/python bench/injection_readouts.py [--layers 6,8,...] [--l2 300,1000]
        # ~35 min on 2 cores for the whole grid; --layers: one layer set instead of three

Clean turns are de-duplicated as the trainer does (context turns shared by both sides of
an item are fitted once). The figures in bench/README.md were measured before that (two
runs: L2 1000-30000 on all three layer sets, then 100-1000 on layers 6-22), with shared
context turns fitted twice.
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

import torch

import acteng
from _common import save
from acteng.activations import record_tokens
from acteng.detectors import read_items
from acteng.methods import fit_logistic
from acteng.pairs import bundled_records, pair_conversation
from acteng.pooling import pooled
from acteng.token_detector import token_labels, validation_cut
from detectors import auroc

LAYER_SETS = [[6, 8, 10, 12, 14, 16, 18, 20, 22], [6, 10, 14, 18, 22], [10, 12, 14, 16, 18]]
L2S = [100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0]
POOLINGS = ["max", "top3", "top8", "top16"]


def wrapped_turns() -> tuple[list[str], list[tuple[int, str]], set[int]]:
    """Every user turn of both sides of the wrapped train items, which item and side it is,
    and a seeded quarter of the items kept out of fitting."""
    rows = bundled_records("wrapped_requests")
    train = [i for i, r in enumerate(rows) if r["split"] == "train"]
    held = set(random.Random(0).sample(train, len(train) // 4))
    texts, where = [], []
    for i in train:
        for side in ("positive", "negative"):
            for m in pair_conversation(rows[i], side):
                if m["role"] == "user" and m["content"].strip():
                    texts.append(m["content"])
                    where.append((i, side))
    return texts, where, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", help="one layer set (comma list) instead of the grid's")
    parser.add_argument("--l2", help="L2 penalties (comma list) instead of the grid's")
    args = parser.parse_args()
    layer_sets = [[int(x) for x in args.layers.split(",")]] if args.layers else LAYER_SETS
    l2s = [float(x) for x in args.l2.split(",")] if args.l2 else L2S
    recorded = sorted({x for layers in layer_sets for x in layers})
    model = acteng.load_model()
    pairs = acteng.load_pairs("prompt_injection", split="train")
    fit, cut = validation_cut(pairs, 0.25, 0)
    turns, where, held = wrapped_turns()
    clean_fit = list(
        dict.fromkeys(t for t, (i, _) in zip(turns, where, strict=True) if i not in held)
    )
    clean_held = [(t, w) for t, w in zip(turns, where, strict=True) if w[0] in held]
    texts = (
        [p.positive for p in fit]
        + [p.negative for p in fit]
        + clean_fit
        + [p.positive for p in cut]
        + [p.negative for p in cut]
        + [t for t, _ in clean_held]
    )
    print(f"{len(fit)} fit pairs, {len(cut)} cut pairs, {len(clean_fit)} clean fit turns, "
          f"{len(clean_held)} held turns", flush=True)  # fmt: skip
    items = read_items(model, texts, "prompt")
    acts = record_tokens(model, items, recorded)
    n_fit = 2 * len(fit) + len(clean_fit)
    y = torch.cat(token_labels(model, list(fit), items[:n_fit]))
    results: list[dict[str, Any]] = []
    for layers in layer_sets:
        at = [recorded.index(x) for x in layers]
        x = torch.cat([a[:, at].flatten(1) for a in acts[:n_fit]])
        for l2 in l2s:
            w, b = fit_logistic(
                x, y, l2=l2, steps=200, positive_weight=(len(y) - y.sum()) / y.sum()
            )
            token_scores = [a[:, at].flatten(1) @ w + b for a in acts[n_fit:]]
            for pooling in POOLINGS:
                s = [float(pooled(t, pooling)) for t in token_scores]
                pos, neg = s[: len(cut)], s[len(cut) : 2 * len(cut)]
                threshold = float(torch.quantile(torch.tensor(neg), 0.95))
                best: dict[tuple[int, str], float] = {}
                for score, (_, w_) in zip(s[2 * len(cut) :], clean_held, strict=True):
                    best[w_] = max(best.get(w_, float("-inf")), score)
                row = {
                    "layers": layers,
                    "l2": l2,
                    "pooling": pooling,
                    "auroc": round(auroc(pos, neg), 4),
                    "injected_flagged": round(sum(v > threshold for v in pos) / len(pos), 4),
                    "wrapped_flagged": round(
                        sum(v > threshold for v in best.values()) / len(best), 4
                    ),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
            del w
        del x
    chosen = max(results, key=lambda r: (r["wrapped_flagged"] <= 0.05, r["injected_flagged"],
                                          r["auroc"]))  # fmt: skip
    print("chosen (most injected flagged with <= 5 % of wrapped flagged):", json.dumps(chosen))
    name = "injection_readouts" + ("" if args.layers is None and args.l2 is None else "_extra")
    print(f"written to {save(name, {'results': results, 'chosen': chosen})}")


if __name__ == "__main__":
    main()
