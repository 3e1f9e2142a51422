"""``acteng calibrate``: new thresholds for detectors from a sample of benign traffic.

One detector: its threshold flags `--target-fpr` of the prompts. Several (a guard that
watches them together): their thresholds are set jointly so that *any of them* flags
`--target-fpr` (`acteng.joint_calibration`). Each recalibrated detector is written to
``--out-dir/<name>.safetensors``; the originals are never changed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from acteng.cli.common import add_model_args, print_json
from acteng.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="recalibrate detectors on benign prompts (jointly, for a guard over several)",
        description="Score a JSONL file of benign prompts (field 'prompt'; also 'response' "
        "for detectors that read answers), like the traffic the guard will see and held out "
        "from the detectors' training, and set each detector's threshold so the prompts are "
        "flagged at --target-fpr. With several --detector, the thresholds are set together "
        "so that any of them firing stays at --target-fpr (a guard fires when any does). "
        "Lines with a 'group' field (e.g. chat, documents) keep every group within "
        "--target-fpr, not only the whole file.",
    )
    p.add_argument(
        "--detector",
        action="append",
        required=True,
        help="detector file or library name; repeat for a guard over several",
    )
    p.add_argument("--negatives", required=True, help="JSONL file of benign prompts")
    p.add_argument(
        "--target-fpr",
        type=float,
        default=0.05,
        help="the most of the prompts (of each group) that any detector may flag (default 0.05)",
    )
    p.add_argument("--out-dir", required=True, help="folder for the recalibrated detectors")
    p.add_argument("--force", action="store_true", help="replace existing files in --out-dir")
    p.add_argument("--json", action="store_true")
    add_model_args(p)
    p.set_defaults(run=run_calibrate)


def _out_name(source: str) -> str:
    path = Path(source)
    return path.stem if path.suffix == ".safetensors" else path.name


def read_groups(path: str) -> list[str] | None:
    """Each prompt's "group" label, if the file gives any (then every prompt needs one)."""
    from acteng.pairs import read_text_file

    lines = read_text_file(Path(path)).splitlines()
    labels = [json.loads(line).get("group") for line in lines if line.strip()]
    if all(label is None for label in labels):
        return None
    odd = [i + 1 for i, label in enumerate(labels) if not isinstance(label, str) or not label]
    if odd:
        raise ConfigError(
            f"{path}: prompt(s) {odd[:5]} have group {[labels[i - 1] for i in odd[:5]]!r}; "
            "give every prompt a non-empty text label (or none of them)"
        )
    return [str(label) for label in labels]


def few_prompts_note(sizes: dict[str, int], target_fpr: float) -> str | None:
    """A warning where a (group of) prompts is too small for a steady threshold."""
    group, size = min(sizes.items(), key=lambda item: item[1])
    above = int(size * target_fpr)
    if above >= 5:
        return None
    which = f"group {group!r} has {size} prompts" if len(sizes) > 1 else f"{size} prompts"
    if above == 0:
        return (
            f"{which}: at --target-fpr {target_fpr:g} none of them may be flagged, so the "
            f"thresholds sit above all of their scores; give it at least "
            f"{math.ceil(1 / target_fpr) if target_fpr else 'a few hundred'} prompts"
        )
    return (
        f"{which}: at --target-fpr {target_fpr:g} the thresholds rest on its {above} highest "
        "scores; a few hundred prompts give steadier ones"
    )


def run_calibrate(args: argparse.Namespace) -> int:
    from acteng.cli.common import load_model_from_args
    from acteng.cli.detect_cmd import read_prompts
    from acteng.detectors import check_target_fpr, load_detector
    from acteng.joint_calibration import (
        MIN_NEGATIVES,
        calibrate_jointly,
        check_groups,
        reads_answers,
    )
    from acteng.vectors import atomic_write_bytes

    check_target_fpr(args.target_fpr)
    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is not a folder; create it first")
    names = [_out_name(source) for source in args.detector]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"--detector {', '.join(args.detector)} would write the same file name twice in "
            "--out-dir; give each detector once, or copy one under another name"
        )
    outs = [out_dir / f"{name}.safetensors" for name in names]
    sources = {Path(source).resolve() for source in args.detector if Path(source).is_file()}
    if any(out.resolve() in sources for out in outs):
        raise ConfigError(
            f"--out-dir {out_dir} holds the detector files being calibrated; write the "
            "recalibrated ones to another folder (the originals are never replaced)"
        )
    taken = [str(out) for out in outs if out.exists()]
    if taken and not args.force:
        raise ConfigError(
            f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}; choose another "
            "--out-dir or add --force"
        )
    # every input check before the model loads (the detectors' regions need the files)
    detectors = [load_detector(source) for source in args.detector]
    negatives = read_prompts(args.negatives, with_responses=reads_answers(detectors))
    if len(negatives) < MIN_NEGATIVES:
        raise ConfigError(
            f"{args.negatives}: calibration needs at least {MIN_NEGATIVES} prompts, got "
            f"{len(negatives)}"
        )
    groups = read_groups(args.negatives)
    members = check_groups(groups, len(negatives))
    model = load_model_from_args(args)
    for det in detectors:
        det.directions.check_compatible(model)
    calibrated = calibrate_jointly(
        model,
        detectors,
        negatives,
        args.target_fpr,
        source=f"acteng calibrate --negatives {args.negatives}",
        names=names,
        groups=groups,
    )
    files = [det.to_vector().to_bytes() for det in calibrated]  # all built, then written
    for data, out in zip(files, outs, strict=True):
        atomic_write_bytes(out, data)
    rows = [
        {
            "detector": source,
            "out": str(out),
            "threshold": det.threshold,
            "previous_threshold": old.threshold,
            "flagged": det.calibration["flagged_share"],
        }
        for source, out, det, old in zip(args.detector, outs, calibrated, detectors, strict=True)
    ]
    joint = calibrated[0].calibration["joint"]
    union, by_group = joint["union_flagged_share"], joint.get("group_flagged_share")
    note = few_prompts_note({g: len(index) for g, index in members.items()}, args.target_fpr)
    if args.json:
        print_json(
            {
                "detectors": rows,
                "target_fpr": args.target_fpr,
                "negatives": len(negatives),
                "union_flagged": union,
                "group_flagged": by_group,
                "note": note,
            }
        )
        return 0
    alone = " alone" if len(rows) > 1 else ""
    for row in rows:
        print(
            f"{row['detector']}: threshold {row['previous_threshold']:+.3f} -> "
            f"{row['threshold']:+.3f}, flags {row['flagged']:.1%} of {len(negatives)} prompts"
            f"{alone}; written to {row['out']}"
        )
    if len(rows) > 1:
        print(
            f"any of them flags {union:.1%} of the {len(negatives)} prompts (target "
            f"{args.target_fpr:.1%})"
        )
    if by_group:
        print("flagged per group: " + ", ".join(f"{g} {x:.1%}" for g, x in by_group.items()))
    if note:
        print(f"note: {note}")
    return 0
