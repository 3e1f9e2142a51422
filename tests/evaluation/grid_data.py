"""Small held-out data shared by the scoring, sweep and tune tests."""

from __future__ import annotations

import json
from pathlib import Path

import acteng
from acteng.evaluation.tax import load_eval
from acteng.pairs import ContrastivePair, Pairs

NEUTRAL = load_eval("neutral_text", split="test")[:3]


def small_pairs(name: str = "sentiment", train: int = 16, test: int = 6) -> Pairs:
    data = acteng.load_pairs(name)
    return Pairs(tuple(data.split("train")[:train]) + tuple(data.split("test")[:test]), name=name)


def bare_pairs(pairs: Pairs) -> Pairs:
    """`pairs` without their prompts (the ActAdd / CAA / repeng form), splits kept."""
    items = tuple(ContrastivePair(p.positive, p.negative, None, p.split) for p in pairs)
    return Pairs(items, name=f"{pairs.name}_bare")


def write_pairs(path: Path, pairs: Pairs) -> Path:
    rows = (
        {"prompt": p.prompt, "positive": p.positive, "negative": p.negative, "split": p.split}
        for p in pairs
    )
    rows = ({k: v for k, v in r.items() if v is not None} for r in rows)
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path
