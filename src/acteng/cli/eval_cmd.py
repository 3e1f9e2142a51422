"""``acteng eval``: every measure (behaviour, tax, reliability, baseline) for one setting."""

from __future__ import annotations

import argparse
from typing import Any

from acteng.cli.common import (
    add_backend_args,
    add_model_args,
    backend_from_args,
    load_model_from_args,
    print_json,
    whole_number,
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="measure one steering setting: behaviour, tax, reliability",
        description="Measure a vector at one coefficient on a dataset's test split: "
        "behaviour shift, perplexity / accuracy / KL / fluency tax on bundled neutral data, "
        "per-example steerability, and optionally the prompting baseline.",
    )
    p.add_argument("vector", help="vector file or library name")
    p.add_argument("--coefficient", type=float, required=True)
    p.add_argument("--data", required=True, help="pairs file or bundled dataset name")
    p.add_argument("--layers", default=None, help="steer only these layers")
    p.add_argument("--instruction", default=None, help="system instruction for the baseline")
    p.add_argument(
        "--generations", type=whole_number(1), default=8, help="answers generated for fluency"
    )
    p.add_argument("--json", action="store_true")
    add_model_args(p)
    add_backend_args(p)
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from acteng.evaluation.measures import evaluate
    from acteng.layer_selection import parse_layers
    from acteng.library import load_vector

    backend = backend_from_args(args)
    model = load_model_from_args(args)
    vector = load_vector(args.vector, model=model)
    layers = parse_layers(model, args.layers) if args.layers else None
    report = evaluate(
        model,
        vector,
        args.coefficient,
        args.data,
        layers=layers,
        instruction=args.instruction,
        generations=args.generations,
        backend=backend,
    )
    if args.json:
        print_json(report)
        return 0
    b, t, r = report["behaviour"], report["tax"], report["reliability"]
    print(f"setting: {report['setting']}")
    print(
        f"behaviour: margin {b['margin_unsteered']:+.3f} -> {b['margin_steered']:+.3f} "
        f"(shift {b['margin_shift']:+.3f})"
    )
    if "p_match_steered" in b:
        print(f"  p(match) {b['p_match_unsteered']:.3f} -> {b['p_match_steered']:.3f}")
    print(
        f"tax: perplexity {t['perplexity_unsteered']:.2f} -> {t['perplexity_steered']:.2f} "
        f"({100 * t['perplexity_tax']:+.1f} %), accuracy {t['mc_accuracy_unsteered']:.3f} -> "
        f"{t['mc_accuracy_steered']:.3f}, KL {t['next_token_kl']:.4f}, distinct-2 "
        f"{t['distinct_2_unsteered']:.3f} -> {t['distinct_2_steered']:.3f}"
    )
    print(
        f"reliability: mean slope {r['mean_slope']:+.3f}, spread {r['spread']:.3f}, "
        f"anti-steerable {100 * r['anti_steerable']:.0f} %"
    )
    if "baseline" in report:
        print(
            "baseline (mean margin): "
            + ", ".join(f"{k} {v:+.3f}" for k, v in report["baseline"].items())
        )
    return 0
