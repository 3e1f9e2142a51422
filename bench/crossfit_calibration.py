"""Calibrating a token detector by cross-fitting, compared with one validation cut.

Research bench for issue 18. The bundled token detectors (`harmful_request`,
`prompt_injection`) keep a seeded quarter of their train pairs (whole documents or
wrappers) out of fitting and set the threshold at 5 % of that quarter's negatives: the
probe sees 75 % of the train pairs, and the threshold rests on a quarter of the negatives
(about 80 documents for `prompt_injection`, so 5 % is four of them). Cross-fitting uses
all of them: four folds of whole groups (`acteng.token_detector.group_folds`), a probe
fitted without each fold scores that fold's negatives, and the threshold is the 95th
percentile of those out-of-fold scores. The probe shipped is then either the mean of the
four fold probes (``crossfit_mean``) or one probe refitted on all the train pairs
(``crossfit_refit``).

Nothing here reads a test split. The comparison is nested: an outer seeded cut of whole
groups of the *train* pairs plays the unseen data, each method runs on the rest exactly as
the trainer would on the train split, and the outer cut reports AUROC and the shares of
its positives and negatives flagged at the method's threshold (the floors ask >= 90 % /
<= 5 %). Outer seeds 0, 1, 2; activations are recorded once per detector.

``--fractions 0.5,1`` draws a learning curve instead: ``crossfit_refit`` on a seeded share
of the inner pairs (whole groups), scored on the same outer cut, to see whether more
train data of the same kind would still help.

    .venv/bin/python bench/crossfit_calibration.py [harmful_request|prompt_injection]
        [--fractions F,F,...]
        # ~10 min (harmful_request) / ~40 min (prompt_injection) on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

import acteng
from _common import save
from acteng.activations import record_tokens
from acteng.detectors import read_items
from acteng.methods import fit_logistic
from acteng.pairs import Pairs
from acteng.pooling import pooled
from acteng.recipes import RECIPES, recipe_data
from acteng.token_detector import group_folds, token_labels, validation_cut
from detectors import auroc

FOLDS = 4
OUTER_SEEDS = (0, 1, 2)
METHODS = ("validation", "crossfit_mean", "crossfit_refit")


class Recorded:
    """Every train pair's (and clean text's) token activations, labels and fits on them."""

    def __init__(self, model: acteng.Model, name: str) -> None:
        self.recipe = RECIPES[name]
        pairs, clean = recipe_data(name)
        self.train = pairs.split("train")
        self.n = len(self.train)
        texts = [p.positive for p in self.train] + [p.negative for p in self.train]
        texts += list(dict.fromkeys(t for t in clean if t.strip()))
        items = read_items(model, texts, "prompt")
        start = time.perf_counter()
        self.flat = [r.flatten(1) for r in record_tokens(model, items, self.recipe["layers"])]
        print(f"{name}: {self.n} train pairs, {len(texts) - 2 * self.n} clean texts, "
              f"{sum(len(f) for f in self.flat)} tokens recorded in "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
        self.labels = token_labels(model, list(self.train), items)
        self.index = {id(p): i for i, p in enumerate(self.train)}

    def fit(self, pair_ids: list[int]) -> tuple[torch.Tensor, float]:
        """The recipe's probe fitted on these train pairs and every clean text."""
        keep = pair_ids + [self.n + i for i in pair_ids] + list(range(2 * self.n, len(self.flat)))
        if self.recipe["labels"] == "sequence":
            x = torch.stack([self.flat[i].double().mean(0) for i in keep])
            y = torch.tensor([1.0 if i < self.n else 0.0 for i in keep], dtype=torch.float64)
        else:
            x = torch.cat([self.flat[i] for i in keep])
            y = torch.cat([self.labels[i] for i in keep])
        weight = (len(y) - y.sum()) / y.sum()
        # x is a fresh copy (cat / stack), so it is standardised in place: same values
        return fit_logistic(
            x, y, l2=self.recipe["l2"], steps=200, positive_weight=weight, overwrite=True
        )

    def scores(self, probe: tuple[torch.Tensor, float], item_ids: list[int]) -> list[float]:
        w, b = probe
        pooling = self.recipe["pooling"]
        return [float(pooled(self.flat[i].double() @ w.double() + b, pooling)) for i in item_ids]

    def ids(self, pairs: Pairs) -> list[int]:
        return [self.index[id(p)] for p in pairs]


def run_method(
    rec: Recorded, inner: Pairs, method: str
) -> tuple[tuple[torch.Tensor, float], float]:
    """(probe, threshold) as `method` makes them from the `inner` pairs."""
    if method == "validation":
        fit, cut = validation_cut(inner, 0.25, rec.recipe["seed"])
        probe = rec.fit(rec.ids(fit))
        negatives = rec.scores(probe, [rec.n + i for i in rec.ids(cut)])
        return probe, float(torch.quantile(torch.tensor(negatives), 0.95))
    ids = rec.ids(inner)
    folds = group_folds(inner, FOLDS, rec.recipe["seed"])
    probes, negatives = [], []
    for k in range(FOLDS):
        probe = rec.fit([i for i, f in zip(ids, folds, strict=True) if f != k])
        probes.append(probe)
        negatives += rec.scores(
            probe, [rec.n + i for i, f in zip(ids, folds, strict=True) if f == k]
        )
    threshold = float(torch.quantile(torch.tensor(negatives), 0.95))
    if method == "crossfit_mean":
        mean = torch.stack([w for w, _ in probes]).mean(0), sum(b for _, b in probes) / FOLDS
        return mean, threshold
    return rec.fit(ids), threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("detector", choices=["harmful_request", "prompt_injection"])
    parser.add_argument(
        "--fractions", help="comma-separated shares of the inner pairs: a learning curve"
    )
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")] if args.fractions else []
    # (row label, method, share of the inner pairs it fits on)
    runs = [(f"crossfit_refit@{f:g}", "crossfit_refit", f) for f in fractions] or [
        (method, method, 1.0) for method in METHODS
    ]
    model = acteng.load_model()
    rec = Recorded(model, args.detector)
    results: list[dict[str, Any]] = []
    for seed in OUTER_SEEDS:
        inner, outer = validation_cut(rec.train, 0.25, seed)
        pos_ids, neg_ids = rec.ids(outer), [rec.n + i for i in rec.ids(outer)]
        for label, method, share in runs:
            start = time.perf_counter()
            used = inner if share >= 1 else validation_cut(inner, 1 - share, seed + 100)[0]
            probe, threshold = run_method(rec, used, method)
            pos, neg = rec.scores(probe, pos_ids), rec.scores(probe, neg_ids)
            row = {
                "outer_seed": seed,
                "method": label,
                "outer_pairs": len(outer),
                "inner_pairs": len(used),
                "auroc": round(auroc(pos, neg), 4),
                "positives_flagged": round(sum(s > threshold for s in pos) / len(pos), 4),
                "negatives_flagged": round(sum(s > threshold for s in neg) / len(neg), 4),
                "seconds": round(time.perf_counter() - start),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for label, _, _ in runs:
        rows = [r for r in results if r["method"] == label]
        summary[label] = {
            k: round(sum(r[k] for r in rows) / len(rows), 4)
            for k in ("auroc", "positives_flagged", "negatives_flagged")
        }
        print(label, json.dumps(summary[label]))
    name = "crossfit_" + args.detector + ("_curve" if fractions else "")
    print(f"written to {save(name, {'results': results, 'mean': summary})}")


if __name__ == "__main__":
    main()
