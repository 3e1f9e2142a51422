"""Steering modes: plain functions registered by name in `MODES`.

``MODES[name](hidden, direction, coefficient) -> hidden``:

- ``add``     ``x + c * v``
- ``ablate``  ``x - c * (x . v̂) v̂``: project the direction out (c = 1 removes it fully)
- ``clamp``   set the projection on v̂ to ``c * |v|`` whatever it was
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["MODES", "Mode", "register_mode"]

# mode(hidden [..., d], direction [d], coefficient) -> new hidden [..., d]
Mode = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
MODES: dict[str, Mode] = {}


def register_mode(name: str) -> Callable[[Mode], Mode]:
    """Register a steering mode under `name`."""

    def decorate(fn: Mode) -> Mode:
        MODES[name] = fn
        return fn

    return decorate


@register_mode("add")
def _add(hidden: torch.Tensor, direction: torch.Tensor, coefficient: float) -> torch.Tensor:
    return hidden + coefficient * direction


@register_mode("ablate")
def _ablate(hidden: torch.Tensor, direction: torch.Tensor, coefficient: float) -> torch.Tensor:
    norm: torch.Tensor = direction.norm()  # Tensor.norm is untyped in torch
    unit = direction / norm
    projection = hidden @ unit  # [..., pos]
    return hidden - coefficient * projection.unsqueeze(-1) * unit


@register_mode("clamp")
def _clamp(hidden: torch.Tensor, direction: torch.Tensor, coefficient: float) -> torch.Tensor:
    norm: torch.Tensor = direction.norm()  # Tensor.norm is untyped in torch
    unit = direction / norm
    projection = hidden @ unit
    return hidden + (coefficient * norm - projection).unsqueeze(-1) * unit
