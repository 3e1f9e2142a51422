"""``acteng demo``: tune, steer, measure and analyse bundled concepts into one report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from acteng.cli.common import add_model_args, check_writable, load_model_from_args

# acteng.report.demo's DEFAULT_CONCEPTS and DEMO_CONCEPTS (not imported: the CLI starts
# without torch); tests/report/test_demo.py checks they agree.
DEFAULT_CONCEPTS = "sentiment,refusal"
ALL_CONCEPTS = "sentiment,formality,refusal"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: tune vectors for bundled concepts and write an HTML report",
        description="On the embedded model (or --model): tune a vector for each bundled "
        "concept (sentiment and refusal; --concepts chooses) within a perplexity budget, "
        "compare steered and unsteered answers, measure tax, reliability and the prompting "
        "baseline, analyse the vectors, check the harmful-request detector, and write "
        "OUT/report.html (self-contained) and OUT/report.json. About 10 minutes on 2 CPU "
        "cores for the two default concepts, 5 more for each further one.",
    )
    p.add_argument("--out", required=True, help="folder for the report, vectors and plots")
    p.add_argument("--max-tax", type=float, default=0.05, help="perplexity budget (0.05)")
    p.add_argument(
        "--concepts",
        default=DEFAULT_CONCEPTS,
        help=f"comma-separated, among {ALL_CONCEPTS} (default {DEFAULT_CONCEPTS})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_model_args(p)
    p.set_defaults(run=run_demo_cmd)


def run_demo_cmd(args: argparse.Namespace) -> int:
    from acteng.evaluation.scoring import check_budget
    from acteng.report.demo import demo_concepts, run_demo, summary_lines

    check_budget(args.max_tax)
    concepts = demo_concepts([n.strip() for n in args.concepts.split(",") if n.strip()])
    out = Path(args.out)
    check_writable(str(out / "report.html"))
    model = load_model_from_args(args)
    report = run_demo(model, out, concepts=concepts, max_tax=args.max_tax, quiet=args.quiet)
    for line in summary_lines(report):
        print(line)
    print(f"report: {out / 'report.html'} (data: {out / 'report.json'})")
    return 0
