"""Token pooling for detectors: score every token of a read region, keep the top k.

A mean-pooled detector averages the region's activations before projecting, so a short
harmful request inside a long benign wrapper (a role-play set-up, a chatty preamble) is
mostly averaged away. Scoring each token on the same per-layer affine readout and taking
the mean of the k highest scores (``"top<k>"``; ``"max"`` is k = 1) reads the request
wherever it sits; k above 1 keeps one odd token from deciding alone.

``"mean+max"`` / ``"mean+top<k>"`` add the two: the region's mean score (what mean pooling
gives, since the readout is affine) plus its top-k score. A topic word alone ("dog" in a
request to train one) lifts the top score but not the mean, and a long wrapper dilutes
the mean but not the top score, so the sum needs the whole request to read harmful and
the harmful part to stand out (bench/wrapped_readouts.py measures the variants).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from acteng.activations import ReadItem, record_tokens
from acteng.errors import ConfigError
from acteng.models import Model

__all__ = ["MAX_TOP_K", "parse_pooling", "pooled", "token_scores"]

MAX_TOP_K = 4096


def parse_pooling(pooling: Any) -> int:
    """How many top token scores a detector averages: 0 for ``"mean"`` (the region's mean
    activation), 1 for ``"max"``, k for ``"top<k>"`` (the same for ``"mean+max"`` and
    ``"mean+top<k>"``, which add the mean); anything else is a clear error."""
    if pooling == "mean":
        return 0
    top = pooling[5:] if isinstance(pooling, str) and pooling.startswith("mean+") else pooling
    if top == "max":
        return 1
    if isinstance(top, str) and top.startswith("top") and top[3:].isdigit():
        k = int(top[3:])
        if 1 <= k <= MAX_TOP_K:
            return k
    raise ConfigError(
        f"unknown detector pooling {pooling!r}; use 'mean', 'max', 'top<k>' with k from 1 "
        f"to {MAX_TOP_K} (e.g. 'top8'), or 'mean+max' / 'mean+top<k>'"
    )


def token_scores(
    model: Model,
    items: Sequence[ReadItem],
    layers: Sequence[int],
    affine: Sequence[tuple[torch.Tensor, float, float]],
    *,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Per item, every region token's score: the mean over `layers` of
    ``(h . unit - offset) / scale`` with (unit, offset, scale) from `affine` (float64)."""
    units = torch.stack([unit.double().cpu() for unit, _, _ in affine])  # [L, d]
    offsets = torch.tensor([offset for _, offset, _ in affine], dtype=torch.float64)
    scales = torch.tensor([scale for _, _, scale in affine], dtype=torch.float64)
    rows = record_tokens(model, items, layers, batch_size=batch_size)
    return [
        ((torch.einsum("tld,ld->tl", r.double(), units) - offsets) / scales).mean(1) for r in rows
    ]


def pooled(scores: torch.Tensor, pooling: str) -> torch.Tensor:
    """Token `scores` (last dimension) pooled as `pooling` says; top k takes all of them
    when there are fewer. Differentiable, for attacks that optimise the pooled score."""
    k = parse_pooling(pooling)
    mean = scores.mean(dim=-1)
    if not k:
        return mean
    top = scores.topk(min(k, scores.shape[-1]), dim=-1).values.mean(dim=-1)
    return top + mean if pooling.startswith("mean+") else top
