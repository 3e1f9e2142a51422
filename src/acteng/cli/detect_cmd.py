"""``acteng detect``: score prompts with a calibrated detector."""

from __future__ import annotations

import argparse
from typing import Any

from acteng.cli.common import add_model_args, print_json


def register(sub: Any) -> None:
    p = sub.add_parser(
        "detect",
        help="score prompts with a detector",
        description="Score each prompt of a JSONL file (field 'prompt'; also 'response' "
        "for a detector that reads answers) with a detector and flag those above its "
        "calibrated threshold.",
    )
    p.add_argument("--detector", required=True, help="detector file or library name")
    p.add_argument("--prompts", required=True, help="JSONL file with a 'prompt' field per line")
    p.add_argument("--json", action="store_true")
    add_model_args(p)
    p.set_defaults(run=run_detect)


def run_detect(args: argparse.Namespace) -> int:
    from acteng.cli.common import load_model_from_args
    from acteng.detectors import load_detector, read_prompts

    model = load_model_from_args(args)
    detector = load_detector(args.detector, model=model)
    prompts = read_prompts(args.prompts, with_responses=detector.region == "response")
    scores = detector.score(model, prompts)
    results = [{"score": s, "flagged": s > detector.threshold} for s in scores]
    if args.json:
        print_json({"results": results, "threshold": detector.threshold})
    else:
        for prompt, row in zip(prompts, results, strict=True):
            mark = "FLAG" if row["flagged"] else "ok  "
            text = prompt if isinstance(prompt, str) else " -> ".join(prompt)
            print(f"{mark} {row['score']:+8.3f}  {text[:80]}")
        print(
            f"{sum(r['flagged'] for r in results)} of {len(results)} flagged "
            f"(threshold {detector.threshold:.3f})"
        )
    return 0
