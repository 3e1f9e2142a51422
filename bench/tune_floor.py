"""`acteng tune` against the best single-layer mean_diff grid point (issue 3 floor).

For each concept: `tune` chooses method, layer(s) and coefficient within a perplexity
budget; independently, a fresh `Scorer` scores the plain grid (mean_diff, one layer,
each coefficient) on the same held-out pairs and budget, and the best grid point within
the budget is the reference. Floor: tuned effect >= grid effect on every concept.

Concepts: every bundled prompted dataset, and concepts acteng has never seen: the
Anthropic model-written-eval behaviours in ../shared/data/external (CAA A/B items; first
100 items, every fifth held out), read at the answer letter.

    .venv/bin/python bench/tune_floor.py [--quick] [--only sentiment,mwe:survival-instinct]

Results are saved after every concept, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import acteng
from _common import RESULTS, save
from acteng.errors import ConfigError
from acteng.evaluation.scoring import Scorer
from acteng.evaluation.splits import held_out
from acteng.evaluation.tune import TuneResult, tune
from acteng.extraction import extract_many
from acteng.pairs import Pairs
from mwe import EXTERNAL
from mwe import load as load_mwe

BUNDLED = (
    "sentiment",
    "formality",
    "refusal",
    "honesty",
    "hallucination",
    "sycophancy",
    "power_seeking",
    "myopia",
)
UNSEEN = ("corrigible-neutral-HHH", "survival-instinct")
LAYERS = (4, 6, 8, 10, 12, 14)
COEFFICIENTS = (1.0, 2.0, 4.0, 8.0)
BUDGET = 0.05


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="two bundled, one unseen concept")
    parser.add_argument("--only", default=None, help="comma-separated concept names")
    args = parser.parse_args()
    model = acteng.load_model()
    concepts: list[tuple[str, Pairs, str]] = [
        (n, acteng.load_pairs(n), "answer" if n in ("power_seeking", "myopia") else "last")
        for n in (BUNDLED[:2] if args.quick else BUNDLED)
    ]
    if EXTERNAL.is_dir():
        concepts += [
            (f"mwe:{n}", load_mwe(n, 60), "answer") for n in UNSEEN[: 1 if args.quick else 3]
        ]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {name for name, _, _ in concepts}
        if unknown:
            parser.error(f"unknown concept(s) {sorted(unknown)}")
        concepts = [c for c in concepts if c[0] in wanted]
    rows: list[dict[str, Any]] = []
    for name, data, position in concepts:
        start = time.perf_counter()
        try:
            result: TuneResult | None = tune(
                model,
                data,
                max_tax=BUDGET,
                layers=list(LAYERS),
                coefficients=COEFFICIENTS,
                position=position,
            )
        except ConfigError as exc:  # nothing within the budget
            result, reason = None, str(exc)
        tuned_s = time.perf_counter() - start
        fit, test = held_out(data)
        vector = extract_many(model, fit, ["mean_diff"], list(LAYERS), position)["mean_diff"]
        scorer = Scorer(model, test)
        grid = [
            scorer.score("mean_diff", vector, [x], c, max_tax=BUDGET)
            for x in LAYERS
            for c in COEFFICIENTS
        ]
        best = max((c for c in grid if c.within(BUDGET)), key=lambda c: c.effect, default=None)
        tuned = (
            {
                "method": result.method,
                "layers": list(result.layers),
                "coefficient": result.coefficient,
                "effect": result.effect,
                "tax": result.tax,
                "p_match": result.p_match,
            }
            if result
            else {"none_within_budget": reason}
        )
        met = best is None if result is None else best is None or result.effect >= best.effect
        row = {
            "concept": name,
            "tuned": tuned,
            "grid_best": best.to_json() if best else None,
            "floor_met": met,
            "tune_seconds": round(tuned_s, 1),
        }
        rows.append(row)
        g = f"{best.effect:+.3f} (L{best.layers[0]} c={best.coefficient:g})" if best else "none"
        t = (
            f"{result.effect:+.3f} ({result.method} {list(result.layers)} "
            f"c={result.coefficient:.3g}, tax {100 * result.tax:+.1f} %)"
            if result
            else "none within budget"
        )
        print(
            f"{name:32s} tuned {t} | grid {g} | {'OK' if met else 'BELOW'} | {tuned_s:.0f} s",
            flush=True,
        )
        _save(rows)
    met_count = sum(r["floor_met"] for r in rows)
    gains = [
        r["tuned"]["effect"] / r["grid_best"]["effect"]
        for r in rows
        if r["grid_best"] and r["grid_best"]["effect"] > 0 and "effect" in r["tuned"]
    ]
    print(
        f"floor met on {met_count}/{len(rows)}; median tuned/grid effect ratio "
        f"{sorted(gains)[len(gains) // 2] if gains else math.nan:.2f}"
    )


def _save(rows: list[dict[str, Any]]) -> None:
    """Write the rows so far; with --only, rows of other concepts already saved stay."""
    path = RESULTS / "tune_floor.json"
    kept = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {r["concept"] for r in rows}
    merged = [r for r in kept if r["concept"] not in done] + rows
    save(
        "tune_floor",
        {"budget": BUDGET, "layers": LAYERS, "coefficients": COEFFICIENTS, "rows": merged},
    )


if __name__ == "__main__":
    main()
