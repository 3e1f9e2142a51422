"""`extract`: contrastive pairs in, a `SteeringVector` with provenance out.

Positive and negative texts go through one `record_activations` call, so every requested
layer comes from a single pass over the data; the registered method then reduces each
layer in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from acteng.activations import record_pairs
from acteng.backends import BackendChoice
from acteng.errors import ConfigError
from acteng.layer_selection import parse_layers
from acteng.methods import METHODS
from acteng.models import Model
from acteng.pairs import Pairs, load_pairs
from acteng.vectors import SteeringVector

__all__ = ["extract", "extract_many"]


def extract(
    model: Model,
    pairs: Pairs | str | Path | Sequence[Any],
    method: str = "mean_diff",
    layers: int | str | Sequence[int] | None = None,
    position: str = "last",
    *,
    normalize: str | None = None,
    batch_size: int = 32,
    progress: bool = False,
    backend: BackendChoice = "local",
) -> SteeringVector:
    """Build a steering vector from contrastive pairs.

    `method` is one of ``actadd``, ``mean_diff``, ``pca``, ``probe`` (see
    `acteng.methods`); `position` is ``last``, ``mean`` or ``answer``; `normalize` is None
    (keep the method's scale) or ``"unit"``. `backend` ``"ray"`` records the activations
    on a Ray cluster (see `acteng.backends`); the vector is the same.

    >>> pairs = acteng.load_pairs("sentiment", split="train")
    >>> vector = acteng.extract(model, pairs, method="mean_diff", layers=[12])
    >>> vector.layers
    (12,)
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; use one of {', '.join(sorted(METHODS))}")
    dataset = load_pairs(pairs)
    chosen = parse_layers(model, layers)
    if method == "actadd" and len(dataset) != 1:
        raise ConfigError(
            f"actadd takes exactly one pair, got {len(dataset)}; use method 'mean_diff' for "
            "several pairs"
        )
    return extract_many(
        model,
        dataset,
        [method],
        chosen,
        position,
        normalize=normalize,
        batch_size=batch_size,
        progress=progress,
        backend=backend,
    )[method]


def extract_many(
    model: Model,
    pairs: Pairs | str | Path | Sequence[Any],
    methods: Sequence[str],
    layers: int | str | Sequence[int] | None = None,
    position: str = "last",
    *,
    normalize: str | None = None,
    batch_size: int = 32,
    progress: bool = False,
    backend: BackendChoice = "local",
) -> dict[str, SteeringVector]:
    """One vector per method from a single recording pass (what sweeps and tuning use)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(
            f"unknown method(s) {unknown or methods!r}; use one or more of "
            f"{', '.join(sorted(METHODS))}"
        )
    if normalize not in (None, "unit"):
        raise ConfigError(f"unknown normalize {normalize!r}; use None or 'unit'")
    dataset = load_pairs(pairs)
    chosen = parse_layers(model, layers)
    pos, neg = record_pairs(
        model,
        dataset,
        chosen,
        position,
        batch_size=batch_size,
        progress=progress,
        backend=backend,
    )
    created = datetime.now(UTC).isoformat(timespec="seconds")
    out = {}
    for method in methods:
        directions: dict[int, torch.Tensor] = {}
        for layer in chosen:
            direction = METHODS[method](pos[layer], neg[layer])
            if float(direction.norm()) == 0.0:
                raise ConfigError(
                    f"layer {layer}: the positives and negatives of {dataset.name!r} give a "
                    "zero direction (identical texts?); the pairs must differ in the concept"
                )
            if normalize == "unit":
                direction = direction / direction.norm().clamp_min(1e-12)
            directions[layer] = direction.to(torch.float32)
        metadata = {
            "model": model.identity(),
            "method": method,
            "read_position": position,
            "normalize": normalize,
            "dataset": dataset.provenance(),
            "created": created,
        }
        out[method] = SteeringVector(directions, metadata)
    return out
