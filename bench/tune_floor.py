"""`acteng tune` against the best single-layer mean_diff grid point (issue 3 floor).

For each concept: `tune` chooses method, layer(s) and coefficient within a perplexity
budget; independently, a fresh `Scorer` scores the plain grid (mean_diff, one layer,
each coefficient) on the same held-out pairs and budget, and the best grid point within
the budget is the reference. Floor: tuned effect >= grid effect on every concept.

Concepts: every bundled prompted dataset, and concepts acteng has never seen: the
Anthropic model-written-eval behaviours in ../shared/data/external (CAA A/B items; first
100 items, every fifth held out), read at the answer letter.

    .venv/bin/python bench/tune_floor.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import acteng
from _common import save
from acteng.extraction import extract_many
from acteng.pairs import Pairs
from acteng.tuning import Scorer, held_out, tune

EXTERNAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "external"
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
UNSEEN = ("corrigible-neutral-HHH", "survival-instinct", "coordinate-other-ais")
LAYERS = (4, 6, 8, 10, 12, 14)
COEFFICIENTS = (2.0, 4.0, 8.0)
BUDGET = 0.05


def unseen(name: str, n: int = 100) -> Pairs:
    rows = [json.loads(line) for line in (EXTERNAL / f"mwe_{name}.jsonl").open()][:n]
    return acteng.load_pairs(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="two bundled, one unseen concept")
    args = parser.parse_args()
    model = acteng.load_model()
    concepts: list[tuple[str, Pairs, str]] = [
        (n, acteng.load_pairs(n), "answer" if n in ("power_seeking", "myopia") else "last")
        for n in (BUNDLED[:2] if args.quick else BUNDLED)
    ]
    if EXTERNAL.is_dir():
        concepts += [(f"mwe:{n}", unseen(n), "answer") for n in UNSEEN[: 1 if args.quick else 3]]
    rows = []
    for name, data, position in concepts:
        start = time.perf_counter()
        result = tune(
            model,
            data,
            max_tax=BUDGET,
            layers=list(LAYERS),
            coefficients=COEFFICIENTS,
            position=position,
        )
        tuned_s = time.perf_counter() - start
        fit, test = held_out(data)
        vector = extract_many(model, fit, ["mean_diff"], list(LAYERS), position)["mean_diff"]
        scorer = Scorer(model, test)
        grid = [
            scorer.score("mean_diff", vector, [x], c, max_tax=BUDGET)
            for x in LAYERS
            for c in COEFFICIENTS
        ]
        eligible = [c for c in grid if c.within(BUDGET)]
        best = max(eligible, key=lambda c: c.effect, default=None)
        row = {
            "concept": name,
            "tuned": {
                "method": result.method,
                "layers": list(result.layers),
                "coefficient": result.coefficient,
                "effect": result.effect,
                "tax": result.tax,
                "p_match": result.p_match,
            },
            "grid_best": best.to_json() if best else None,
            "floor_met": best is None or result.effect >= best.effect - 1e-9,
            "tune_seconds": round(tuned_s, 1),
        }
        rows.append(row)
        g = f"{best.effect:+.3f} (L{best.layers[0]} c={best.coefficient:g})" if best else "none"
        print(
            f"{name:32s} tuned {result.effect:+.3f} ({result.method} {list(result.layers)} "
            f"c={result.coefficient:.3g}, tax {100 * result.tax:+.1f} %) | grid {g} | "
            f"{'OK' if row['floor_met'] else 'BELOW'} | {tuned_s:.0f} s",
            flush=True,
        )
    met = sum(r["floor_met"] for r in rows)
    gains = [
        r["tuned"]["effect"] / r["grid_best"]["effect"]
        for r in rows
        if r["grid_best"] and r["grid_best"]["effect"] > 0
    ]
    print(
        f"floor met on {met}/{len(rows)}; median tuned/grid effect ratio "
        f"{sorted(gains)[len(gains) // 2] if gains else math.nan:.2f}"
    )
    save(
        "tune_floor",
        {"budget": BUDGET, "layers": LAYERS, "coefficients": COEFFICIENTS, "rows": rows},
    )


if __name__ == "__main__":
    main()
