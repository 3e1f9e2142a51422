"""``acteng detect``: score prompts with a calibrated detector."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acteng.cli.common import add_model_args, print_json
from acteng.errors import ConfigError

if TYPE_CHECKING:  # acteng.detectors imports torch; `acteng --help` must not
    from acteng.detectors import Scored


def register(sub: Any) -> None:
    p = sub.add_parser(
        "detect",
        help="score prompts with a detector",
        description="Score prompts (a JSONL file with a 'prompt' field per line, also "
        "'response' for a detector that reads answers; or --prompt on the command line) with "
        "a detector and flag those above its calibrated threshold.",
    )
    p.add_argument("--detector", required=True, help="detector file or library name")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompts", help="JSONL file with a 'prompt' field per line")
    given.add_argument("--prompt", action="append", help="a prompt to score (repeatable)")
    p.add_argument(
        "--response",
        action="append",
        help="the answer to each --prompt, in order, for a detector that reads answers",
    )
    p.add_argument("--json", action="store_true")
    add_model_args(p)
    p.set_defaults(run=run_detect)


def run_detect(args: argparse.Namespace) -> int:
    from acteng.cli.common import load_model_from_args, warn_other_model
    from acteng.detectors import load_detector

    model = load_model_from_args(args)
    detector = load_detector(args.detector, model=model)
    warn_other_model(args.detector, detector, model)
    with_responses = detector.region == "response"
    if args.prompts is not None:
        if args.response:
            raise ConfigError("--response goes with --prompt; a --prompts file has its own")
        prompts = read_prompts(args.prompts, with_responses=with_responses)
    else:
        prompts = given_prompts(args.prompt, args.response, with_responses)
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


def given_prompts(
    prompts: list[str], responses: list[str] | None, with_responses: bool
) -> list[Scored]:
    """The --prompt values (with their --response, in order, for a detector that reads
    answers)."""
    if not with_responses:
        if responses:
            raise ConfigError(
                "--response is for a detector that reads answers; this one reads prompts"
            )
        return list(prompts)
    if not responses or len(responses) != len(prompts):
        raise ConfigError(
            f"this detector reads answers: give one --response per --prompt ({len(prompts)} "
            f"prompts, {len(responses or [])} responses)"
        )
    return list(zip(prompts, responses, strict=True))


def read_prompts(path: str | os.PathLike[str], *, with_responses: bool = False) -> list[Scored]:
    """Prompts from a JSONL file with a "prompt" field per line.

    With `with_responses`, each line also needs a "response" field and the items are
    (prompt, response) pairs, what a ``response`` detector scores.
    """
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"no prompts file at {source}")
    from acteng.errors import DataError
    from acteng.pairs import read_text_file

    try:
        lines = read_text_file(source).splitlines()
    except DataError as exc:  # a bad file of prompts is a bad argument here
        raise ConfigError(str(exc)) from exc
    fields = ("prompt", "response") if with_responses else ("prompt",)
    items: list[Scored] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source} line {lineno}: invalid JSON ({exc.msg})") from exc
        missing = [
            f for f in fields if not isinstance(record, dict) or not isinstance(record.get(f), str)
        ]
        if missing:
            raise ConfigError(
                f"{source} line {lineno}: needs string field(s) {', '.join(map(repr, missing))}"
            )
        items.append((record["prompt"], record["response"]) if with_responses else record["prompt"])
    if not items:
        raise ConfigError(f"{source} has no prompts; write one JSON object per line")
    return items
