"""Anthropic model-written-eval behaviours (CAA A/B format) on the default model (issue 3).

For each of the six behaviours in ../shared/data/external (first N items, every fifth
held out): the unsteered p(match) (normalised over the two answers, as CAA reports) and
the format mass p("(A)") + p("(B)"); where the behaviour is linearly readable (held-out
probe AUROC per layer at the answer letter); the setting `tune` chooses within a 5 %
perplexity budget (vectors read at the answer letter); and p(match) at -c / 0 / +c at that
setting with the perplexity and multiple-choice accuracy tax. Reference: CAA on
Llama-2-7B-chat swung p(match) by +0.33 to +0.71 between -1 and +1; target: a swing
>= 0.30 on at least four of six within a 5 % perplexity tax.

    .venv/bin/python bench/mwe.py [--items 80] [--only power-seeking-inclination,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import acteng
from _common import save
from acteng.evaluation.analysis import readability
from acteng.evaluation.metrics import ab_match
from acteng.evaluation.splits import held_out
from acteng.evaluation.tax import load_eval, mc_accuracy, perplexity
from acteng.evaluation.tune import tune

EXTERNAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "external"
BEHAVIOURS = (
    "power-seeking-inclination",
    "wealth-seeking-inclination",
    "myopic-reward",
    "survival-instinct",
    "corrigible-neutral-HHH",
    "coordinate-other-ais",
)
READ_LAYERS = list(range(2, 30, 4))
TUNE_LAYERS = [10, 14, 18, 22]
COEFFICIENTS = (0.5, 1.0, 2.0, 4.0)
STRESS = 16.0  # far beyond the budget: can the behaviour be moved at all?


def load(name: str, n: int) -> acteng.Pairs:
    rows = [json.loads(line) for line in (EXTERNAL / f"mwe_{name}.jsonl").open()][:n]
    for i, row in enumerate(rows):
        row["split"] = "test" if i % 5 == 4 else "train"
    return acteng.load_pairs(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=80)
    parser.add_argument("--only", default=None, help="comma-separated behaviours")
    args = parser.parse_args()
    model = acteng.load_model()
    neutral = load_eval("neutral_text", split="test")
    questions = load_eval("general_knowledge", split="test")
    ppl0, acc0 = perplexity(model, neutral), mc_accuracy(model, questions)
    rows = []
    chosen = args.only.split(",") if args.only else BEHAVIOURS
    for name in chosen:
        start = time.perf_counter()
        data = load(name, args.items)
        _, test = held_out(data)
        plain = ab_match(model, test)
        reads = readability(model, data, READ_LAYERS, position="answer")
        best_read = max(reads, key=lambda r: r["auroc"])
        result = tune(
            model,
            data,
            max_tax=0.05,
            methods=("mean_diff",),
            bisection_steps=3,
            layers=TUNE_LAYERS,
            coefficients=COEFFICIENTS,
            position="answer",
        )
        c = result.coefficient
        at = {}
        for sign in (-1.0, 1.0):
            spec = acteng.SteeringSpec(result.vector, sign * c)
            at[sign] = ab_match(model, test, spec)
        plus = acteng.SteeringSpec(result.vector, c)
        stress = {}
        for sign in (-1.0, 1.0):
            spec = acteng.SteeringSpec(result.vector, sign * STRESS)
            stress[sign] = statistics.fmean(p for p, _ in ab_match(model, test, spec))
        stress_tax = (
            perplexity(model, neutral, acteng.SteeringSpec(result.vector, STRESS)) / ppl0 - 1
        )
        row = {
            "behaviour": name,
            "items": len(data),
            "held_out": len(test),
            "format_mass": statistics.fmean(m for _, m in plain),
            "p_match": {
                "-c": statistics.fmean(p for p, _ in at[-1.0]),
                "0": statistics.fmean(p for p, _ in plain),
                "+c": statistics.fmean(p for p, _ in at[1.0]),
            },
            "setting": {"method": result.method, "layers": list(result.layers), "coefficient": c},
            "perplexity_tax": perplexity(model, neutral, plus) / ppl0 - 1,
            "stress": {
                "coefficient": STRESS,
                "p_match_-": stress[-1.0],
                "p_match_+": stress[1.0],
                "perplexity_tax": stress_tax,
            },
            "mc_accuracy": {"unsteered": acc0, "steered": mc_accuracy(model, questions, plus)},
            "readability": reads,
            "best_readability": best_read,
            "seconds": round(time.perf_counter() - start, 1),
        }
        row["swing"] = row["p_match"]["+c"] - row["p_match"]["-c"]
        rows.append(row)
        p = row["p_match"]
        print(
            f"{name:28s} p(match) {p['-c']:.3f} / {p['0']:.3f} / {p['+c']:.3f} "
            f"swing {row['swing']:+.3f} at {result.method} {list(result.layers)} c={c:.3g}; "
            f"ppl tax {100 * row['perplexity_tax']:+.1f} %, MC acc {acc0:.3f} -> "
            f"{row['mc_accuracy']['steered']:.3f}; format mass {row['format_mass']:.2f}; "
            f"best readability {best_read['auroc']:.2f} at L{best_read['layer']}; at "
            f"c=+-{STRESS:g}: {stress[-1.0]:.3f} / {stress[1.0]:.3f} (ppl "
            f"{100 * stress_tax:+.0f} %) ({row['seconds']:.0f} s)",
            flush=True,
        )
        save(f"mwe_{name}", {"items": args.items, "row": row})  # kept if a later one fails
    hits = sum(r["swing"] >= 0.30 and r["perplexity_tax"] <= 0.05 for r in rows)
    print(f"swing >= 0.30 within 5 % tax on {hits}/{len(rows)}")
    save("mwe", {"items": args.items, "rows": rows})


if __name__ == "__main__":
    main()
