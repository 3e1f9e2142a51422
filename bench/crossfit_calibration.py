"""Calibrating a token detector by cross-fitting, compared with one validation cut.

Research bench for issue 18. A token detector's threshold can rest on one seeded
validation cut of whole groups of its train pairs (documents, wrappers: `acteng.held_out`)
or on cross-fitting: four folds of whole groups, each fold's negatives scored by a probe
fitted without it, the threshold at the 95th percentile of those out-of-fold scores, and
the probe shipped the mean of the fold probes (``crossfit_mean``) or one refitted on all
the train pairs (``crossfit_refit``, what the bundled detectors do).

Nothing here reads a test split. The comparison is nested: an outer seeded cut of whole
groups of the *train* pairs plays the unseen data, each method runs on the rest exactly as
the trainer would on the train split, and the outer cut reports AUROC and the shares of
its positives and negatives flagged at the method's threshold (the floors ask >= 90 % /
<= 5 %). Outer seeds 0, 1, 2; activations are recorded once per detector.

``--fractions 0.5,1`` draws a learning curve instead: ``crossfit_refit`` on a seeded share
of the inner pairs (whole groups), scored on the same outer cut, to see whether more
train data of the same kind would still help.

``--leave-out`` asks how the recipe carries over to a kind of input it has never seen: one
probe per carrier (`prompt_injection`) or wrapper family (`harmful_request`'s wrapped
pairs; its plain team pairs are always fitted), fitted on the train pairs of every other
kind and scoring that kind's pairs. Beside it, the same number of probes on as many
seeded folds of whole documents (`group_folds`), each fitted on as much data: the gap
between the two is what an unseen kind costs. The held-out scores of all the probes are
put together, and the threshold flags 5 % of those negatives (so a kind whose scores sit
higher or lower as a whole shows up in its shares flagged). ``--l2`` / ``--pooling``
(comma lists) compare other settings than the recipe's on the unseen kinds
(``--documents``: on the document folds too).

``--unseen-wording`` asks what the document folds leave out: the test splits also write
their own planted instructions (and requests), whereas train documents share them (an
injected line recurs in up to six). Four folds of whole documents; each fold scored by a
probe fitted on (a) every other pair, (b) only the other pairs whose differing span (the
planted line, the request) shares no run of 5 words with a span in the fold, and (c) as
many other pairs drawn at random, so (b) against (c) is the cost of unseen wording at the
same amount of data. ``--l2`` / ``--pooling`` compare settings on (b).

    .venv/bin/python bench/crossfit_calibration.py [harmful_request|prompt_injection]
        [--fractions F,F,... | --leave-out [--l2 L,L --pooling P,P [--documents]]
         | --unseen-wording [--l2 L,L --pooling P,P]]
        # ~10 min (harmful_request) / ~40 min (prompt_injection) on 2 cores;
        # --leave-out ~2 / ~35 min
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections.abc import Sequence
from typing import Any

import torch

import acteng
from _common import save
from acteng.activations import record_tokens
from acteng.detectors import read_items
from acteng.methods import fit_logistic
from acteng.pairs import Pairs, bundled_records
from acteng.pooling import parse_pooling, pooled
from acteng.recipes import RECIPES, recipe_data
from acteng.token_detector import differing_span, group_folds, token_labels, validation_cut
from detectors import auroc

FOLDS = 4
RUN = 5  # words: with --unseen-wording no fitted pair shares a run this long of its span
OUTER_SEEDS = (0, 1, 2)
METHODS = ("validation", "crossfit_mean", "crossfit_refit")


def contrast_pooled(scores: torch.Tensor, pooling: str) -> torch.Tensor:
    """`acteng.pooling.pooled`, plus a variant tried here and not shipped: ``"top<k>-mean"``
    / ``"max-mean"``, how far the top tokens stand out from the message's mean (an unseen
    carrier shifts a probe's token scores as a whole; the contrast would cancel that)."""
    if pooling.endswith("-mean"):
        return pooled(scores, pooling[: -len("-mean")]) - scores.mean()
    return pooled(scores, pooling)


def threshold_at_5(negatives: list[float]) -> float:
    """The threshold that flags 5 % of these negatives' scores."""
    return float(torch.quantile(torch.tensor(negatives), 0.95))


def flagged(pos: list[float], neg: list[float], threshold: float) -> dict[str, float]:
    """AUROC and the shares of positives and negatives scored above `threshold`."""
    return {
        "auroc": round(auroc(pos, neg), 4),
        "positives_flagged": round(sum(s > threshold for s in pos) / len(pos), 4),
        "negatives_flagged": round(sum(s > threshold for s in neg) / len(neg), 4),
    }


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

    def fit(
        self, pair_ids: list[int], l2: float | None = None, extra: Sequence[torch.Tensor] = ()
    ) -> tuple[torch.Tensor, float]:
        """The recipe's probe (or one with another `l2`) fitted on these train pairs, every
        clean text, and `extra` clean texts' recorded tokens (negatives too)."""
        keep = pair_ids + [self.n + i for i in pair_ids] + list(range(2 * self.n, len(self.flat)))
        rows = [self.flat[i] for i in keep] + list(extra)
        if self.recipe["labels"] == "sequence":
            x = torch.stack([r.double().mean(0) for r in rows])
            sides = [1.0 if i < self.n else 0.0 for i in keep] + [0.0] * len(extra)
            y = torch.tensor(sides, dtype=torch.float64)
        else:
            x = torch.cat(rows)
            y = torch.cat([self.labels[i] for i in keep] + [torch.zeros(len(r)) for r in extra])
        weight = (len(y) - y.sum()) / y.sum()
        # x is a fresh copy (cat / stack), so it is standardised in place: same values
        l2 = self.recipe["l2"] if l2 is None else l2
        return fit_logistic(x, y, l2=l2, steps=200, positive_weight=weight, overwrite=True)

    def scores(
        self, probe: tuple[torch.Tensor, float], item_ids: list[int], pooling: str | None = None
    ) -> list[float]:
        return self.score_rows(probe, [self.flat[i] for i in item_ids], pooling)

    def score_rows(
        self,
        probe: tuple[torch.Tensor, float],
        rows: list[torch.Tensor],
        pooling: str | None = None,
    ) -> list[float]:
        """Pooled probe scores of recorded token matrices (this one's or recorded apart)."""
        w, b = probe
        pooling = pooling or self.recipe["pooling"]
        return [float(contrast_pooled(r.double() @ w.double() + b, pooling)) for r in rows]

    def ids(self, pairs: Pairs) -> list[int]:
        return [self.index[id(p)] for p in pairs]


def run_method(
    rec: Recorded, inner: Pairs, method: str, extra: Sequence[torch.Tensor] = ()
) -> tuple[tuple[torch.Tensor, float], float]:
    """(probe, threshold) as `method` makes them from the `inner` pairs (and `extra` clean
    texts' tokens, fitted as negatives and never calibrated on, as the trainer's `clean`)."""
    if method == "validation":
        fit, cut = validation_cut(inner, 0.25, rec.recipe["seed"])
        probe = rec.fit(rec.ids(fit), extra=extra)
        negatives = rec.scores(probe, [rec.n + i for i in rec.ids(cut)])
        return probe, threshold_at_5(negatives)
    ids = rec.ids(inner)
    folds = group_folds(inner, FOLDS, rec.recipe["seed"])
    probes, negatives = [], []
    for k in range(FOLDS):
        probe = rec.fit([i for i, f in zip(ids, folds, strict=True) if f != k], extra=extra)
        probes.append(probe)
        negatives += rec.scores(
            probe, [rec.n + i for i, f in zip(ids, folds, strict=True) if f == k]
        )
    threshold = threshold_at_5(negatives)
    if method == "crossfit_mean":
        mean = torch.stack([w for w, _ in probes]).mean(0), sum(b for _, b in probes) / FOLDS
        return mean, threshold
    return rec.fit(ids, extra=extra), threshold


def kinds(rec: Recorded) -> list[str | None]:
    """Each train pair's kind: its carrier or wrapper family, None for pairs without one."""
    out: list[str | None] = []
    for name in rec.recipe["pairs"]:
        rows = [r for r in bundled_records(name) if r.get("split") == "train"]
        out += [r.get("carrier", r.get("family")) for r in rows]
    if len(out) != rec.n:
        raise RuntimeError(f"{len(out)} train records for {rec.n} train pairs")
    return out


def held_out_scores(
    rec: Recorded,
    groups: list[str | None],
    l2: float | None = None,
    poolings: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every pair with a group scored by the probe fitted without its group; per pooling,
    AUROC and shares flagged at the threshold that flags 5 % of all those negatives,
    overall and per group."""
    poolings = poolings or [rec.recipe["pooling"]]
    scored: dict[str, dict[str, tuple[list[float], list[float]]]] = {p: {} for p in poolings}
    for g in sorted({g for g in groups if g is not None}):
        start = time.perf_counter()
        inside = [i for i in range(rec.n) if groups[i] == g]
        probe = rec.fit([i for i in range(rec.n) if groups[i] != g], l2)
        for p in poolings:
            scored[p][g] = (
                rec.scores(probe, inside, p),
                rec.scores(probe, [rec.n + i for i in inside], p),
            )
        print(f"  {g}: {len(inside)} pairs, AUROC {auroc(*scored[poolings[0]][g]):.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    return {p: _flagged_by_group(by_group) for p, by_group in scored.items()}


def _flagged_by_group(scored: dict[str, tuple[list[float], list[float]]]) -> dict[str, Any]:
    pos = [s for p, _ in scored.values() for s in p]
    neg = [s for _, n in scored.values() for s in n]
    threshold = threshold_at_5(neg)

    def row(p: list[float], n: list[float]) -> dict[str, Any]:
        return {"pairs": len(p), **flagged(p, n, threshold)}

    groups = {g: row(p, n) for g, (p, n) in scored.items()}
    mean = round(sum(r["auroc"] for r in groups.values()) / len(groups), 4)
    return {"all": row(pos, neg), "mean_group_auroc": mean, "groups": groups}


def document_folds(rec: Recorded, groups: list[str | None]) -> list[str | None]:
    """As many seeded folds of whole documents as there are kinds, over the pairs that
    have a kind (the others are always fitted, as when leaving kinds out)."""
    with_kind = [i for i in range(rec.n) if groups[i] is not None]
    count = len({groups[i] for i in with_kind})
    folds = group_folds(Pairs(tuple(rec.train[i] for i in with_kind)), count, rec.recipe["seed"])
    by_fold: list[str | None] = [None] * rec.n
    for i, f in zip(with_kind, folds, strict=True):
        by_fold[i] = f"fold{f}"
    return by_fold


def leave_out(
    rec: Recorded, l2s: list[float], poolings: list[str], documents: bool
) -> dict[str, Any]:
    """Leave-one-kind-out, and with `documents` as many folds of whole documents (see the
    docstring), for the recipe's L2 and pooling or each of `l2s` x `poolings`."""
    groups = kinds(rec)
    groupings = {"unseen_kind": groups}
    if documents:
        groupings["document_folds"] = document_folds(rec, groups)
    out = {}
    for name, grouping in groupings.items():
        for l2 in l2s or [rec.recipe["l2"]]:
            print(f"{name}, L2 {l2:g}", flush=True)
            for pooling, res in held_out_scores(rec, grouping, l2, poolings).items():
                out[f"{name}:l2={l2:g},{pooling}"] = res
                print(f"{name} L2 {l2:g} {pooling}: mean group AUROC "
                      f"{res['mean_group_auroc']}", json.dumps(res["all"]), flush=True)  # fmt: skip
    return out


def word_runs(text: str, run: int = RUN) -> set[str]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {" ".join(words[j : j + run]) for j in range(len(words) - run + 1)}


def unseen_wording(rec: Recorded, l2s: list[float], poolings: list[str]) -> dict[str, Any]:
    """Document folds scored by probes fitted on every other pair, on the other pairs whose
    span shares no `RUN`-word run with the fold's spans, and on as many random other pairs
    (see the docstring); with `l2s` / `poolings`, those settings on the second only."""
    # the span the probe's positive tokens come from: the planted line, the request
    spans = [word_runs(p.positive[slice(*differing_span(p.positive, p.negative))])
             for p in rec.train]  # fmt: skip
    folds = group_folds(rec.train, FOLDS, rec.recipe["seed"])
    compare = bool(l2s or poolings)
    l2s, poolings = l2s or [rec.recipe["l2"]], poolings or [rec.recipe["pooling"]]
    scored: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for k in range(FOLDS):
        held = [i for i in range(rec.n) if folds[i] == k]
        held_runs = set().union(*(spans[i] for i in held))
        rest = [i for i in range(rec.n) if folds[i] != k]
        unseen = [i for i in rest if not spans[i] & held_runs]
        fits = {"unseen_wording": unseen}
        if not compare:
            control = sorted(random.Random(rec.recipe["seed"] + k).sample(rest, len(unseen)))
            fits = {"all_documents": rest, "same_size": control, **fits}
        print(f"fold {k}: {len(held)} held out; fitted on {len(rest)} / {len(unseen)} "
              "without their wording", flush=True)  # fmt: skip
        for name, ids in fits.items():
            for l2 in l2s:
                probe = rec.fit(ids, l2)
                for pooling in poolings:
                    label = f"{name}:l2={l2:g},{pooling}"
                    pos = rec.scores(probe, held, pooling)
                    neg = rec.scores(probe, [rec.n + i for i in held], pooling)
                    scored.setdefault(label, {})[f"fold{k}"] = (pos, neg)
    out = {}
    for label, by_fold in scored.items():
        out[label] = _flagged_by_group(by_fold)
        print(label, json.dumps(out[label]["all"]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("detector", choices=["harmful_request", "prompt_injection"])
    parser.add_argument(
        "--fractions", help="comma-separated shares of the inner pairs: a learning curve"
    )
    parser.add_argument(
        "--leave-out",
        action="store_true",
        help="leave one carrier / wrapper family out at a time, against document folds",
    )
    parser.add_argument(
        "--unseen-wording",
        action="store_true",
        help="document folds whose planted lines / requests no fitted pair shares",
    )
    parser.add_argument(
        "--l2", help="with --leave-out / --unseen-wording: L2 penalties to compare (comma list)"
    )
    parser.add_argument(
        "--pooling", help="with --leave-out / --unseen-wording: poolings to compare (comma list)"
    )
    parser.add_argument(
        "--documents",
        action="store_true",
        help="with --l2 / --pooling: document folds too (always run without them)",
    )
    args = parser.parse_args()
    held_out = args.leave_out or args.unseen_wording
    if not held_out and (args.l2 or args.pooling):
        parser.error("--l2 and --pooling compare settings of --leave-out or --unseen-wording")
    if args.documents and not args.leave_out:
        parser.error("--documents adds document folds to --leave-out: add it")
    if held_out:
        if sum(map(bool, (args.fractions, args.leave_out, args.unseen_wording))) > 1:
            parser.error("--fractions, --leave-out and --unseen-wording are different runs")
        try:
            l2s = [float(x) for x in args.l2.split(",")] if args.l2 else []
        except ValueError:
            parser.error(f"--l2 takes numbers separated by commas (e.g. 300,1000), got {args.l2!r}")
        poolings = args.pooling.split(",") if args.pooling else []
        for pooling in poolings:  # before minutes of recording
            parse_pooling(pooling.removesuffix("-mean"))
        rec = Recorded(acteng.load_model(), args.detector)
        if args.unseen_wording:
            out, name = unseen_wording(rec, l2s, poolings), "unseen_wording_"
        else:
            out = leave_out(rec, l2s, poolings, args.documents or not (l2s or poolings))
            name = "leave_out_"
        name += args.detector + ("_settings" if l2s or poolings else "")
        print(f"written to {save(name, out)}")
        return
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
                **flagged(pos, neg, threshold),
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
