"""Steering at inference: `SteeringSpec` (steering as data), `MODES`, and `steer`.

A spec says which vector, how strong, at which layers, at which token positions and in
which mode. Modes are plain functions registered by name,
``MODES[name](hidden, direction, coefficient) -> hidden``:

- ``add``     ``x + c * v``
- ``ablate``  ``x - c * (x . v̂) v̂``: project the direction out (c = 1 removes it fully)
- ``clamp``   set the projection on v̂ to ``c * |v|`` whatever it was

Layer i is the output of block i (``hidden_states[i + 1]`` in transformers), so steering at
layer i changes what every later block reads. Several specs may be active at once; on a
shared layer they apply in the order given.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from acteng.errors import ConfigError
from acteng.hooks import BlockFn, ForwardContext, HookHandle, attach
from acteng.models import Model
from acteng.positions import Positions, parse_positions
from acteng.vectors import SteeringVector

__all__ = ["MODES", "SteeringSpec", "apply_steering", "register_mode", "steer"]

# mode(hidden [..., d], direction [d], coefficient) -> new hidden [..., d]
Mode = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
MODES: dict[str, Mode] = {}

# Coefficients beyond this are almost surely a typo (activations would overflow).
MAX_ABS_COEFFICIENT = 1e4


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


@dataclass(frozen=True)
class SteeringSpec:
    """One steering operation; the same value in Python, HTTP and CLI.

    `layers` None means every layer of the vector; `positions` is ``all``, ``prompt``,
    ``generated`` or a window ``"start:end"``.

    >>> spec = SteeringSpec(vector, coefficient=4.0, layers=(12,), positions="generated")
    >>> with acteng.steer(model, spec): ...
    """

    vector: SteeringVector
    coefficient: float = 1.0
    layers: tuple[int, ...] | None = None
    # A str is accepted and parsed by __post_init__, so after construction this is
    # always a Positions.
    positions: Positions | str = field(default_factory=Positions)
    mode: str = "add"

    def __post_init__(self) -> None:
        if not isinstance(self.vector, SteeringVector):
            raise ConfigError(
                f"a steering spec needs a SteeringVector, got {type(self.vector).__name__}; "
                "load one with acteng.SteeringVector.load(path)"
            )
        coefficient = self.coefficient
        if isinstance(coefficient, bool) or not isinstance(coefficient, numbers.Real):
            raise ConfigError(f"coefficient must be a number, got {coefficient!r}")
        if not math.isfinite(coefficient) or abs(coefficient) > MAX_ABS_COEFFICIENT:
            raise ConfigError(
                f"coefficient {coefficient} is not usable; give a finite number with "
                f"|c| <= {MAX_ABS_COEFFICIENT:g}"
            )
        object.__setattr__(self, "coefficient", float(coefficient))
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        object.__setattr__(self, "positions", parse_positions(self.positions))
        if self.layers is not None:
            raw = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            if not raw or not all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
                raise ConfigError(
                    f"layers must be a non-empty list of layer numbers, got {self.layers!r}; "
                    "leave it out to steer every layer of the vector"
                )
            layers = tuple(int(x) for x in raw)
            if len(set(layers)) != len(layers):
                raise ConfigError(f"layers {list(layers)} repeat a layer; list each layer once")
            missing = [x for x in layers if x not in self.vector.directions]
            if missing:
                raise ConfigError(
                    f"layer(s) {missing} are not in the vector (it has "
                    f"{list(self.vector.layers)}); choose layers the vector was extracted at"
                )
            object.__setattr__(self, "layers", layers)
        if self.mode in ("ablate", "clamp"):
            zero = [x for x in self.active_layers if float(self.vector[x].norm()) == 0.0]
            if zero:
                raise ConfigError(
                    f"mode {self.mode!r} needs a non-zero direction; layer(s) {zero} are zero"
                )

    @property
    def active_layers(self) -> tuple[int, ...]:
        return self.layers if self.layers is not None else self.vector.layers


def _row_mask(rows: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    if rows.shape != hidden.shape[:1]:
        raise ConfigError(
            f"the steering row gate has {rows.shape[0]} rows but the batch has "
            f"{hidden.shape[0]}; give one bool per batch row"
        )
    return rows.to(hidden.device).view(-1, 1, 1)


def _block_fn(spec: SteeringSpec, direction: torch.Tensor, rows: torch.Tensor | None) -> BlockFn:
    mode, coefficient = MODES[spec.mode], spec.coefficient
    positions = parse_positions(spec.positions)  # already a Positions: returned as is
    if positions.kind == "all" and rows is None:

        def steer_all(_layer: int, hidden: torch.Tensor, _ctx: ForwardContext) -> torch.Tensor:
            return mode(hidden, direction, coefficient)

        return steer_all

    if positions.kind == "all":
        assert rows is not None  # the branch above took rows=None
        gate = rows

        def steer_rows(_layer: int, hidden: torch.Tensor, _ctx: ForwardContext) -> torch.Tensor:
            keep = _row_mask(gate, hidden)
            return torch.where(keep, mode(hidden, direction, coefficient), hidden)

        return steer_rows

    def steer_some(_layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        index = ctx.token_index
        if index is None or ctx.prompt_len is None or index.shape != hidden.shape[:2]:
            raise ConfigError(
                f"positions {positions} need to know where each token sits, which acteng "
                "reads when the forward pass goes through model.hf; call model.hf (or "
                "model.hf.generate), not one of its submodules, or steer with positions 'all'"
            )
        keep = positions.mask(index, ctx.prompt_len).unsqueeze(-1)  # [batch, q, 1]
        if rows is not None:
            keep = keep & _row_mask(rows, hidden)
        return torch.where(keep, mode(hidden, direction, coefficient), hidden)

    return steer_some


def as_specs(
    steering: SteeringVector | SteeringSpec | Sequence[SteeringSpec],
    coefficient: float | None,
    layers: Sequence[int] | int | None,
    positions: str | Positions | None,
    mode: str | None,
) -> list[SteeringSpec]:
    """The specs `steer` would apply for these arguments (overrides applied to each)."""
    overrides: dict[str, Any] = {
        k: v
        for k, v in (("coefficient", coefficient), ("positions", positions), ("mode", mode))
        if v is not None
    }
    if layers is not None:
        overrides["layers"] = (layers,) if isinstance(layers, int) else tuple(layers)
    if isinstance(steering, SteeringVector):
        return [SteeringSpec(steering, **overrides)]
    specs = [steering] if isinstance(steering, SteeringSpec) else list(steering)
    bad = [type(s).__name__ for s in specs if not isinstance(s, SteeringSpec)]
    if bad:
        raise ConfigError(f"steer takes a SteeringVector or SteeringSpecs, got {bad}")
    if not specs:
        raise ConfigError("nothing to steer with: pass a vector or at least one spec")
    return [replace(s, **overrides) for s in specs] if overrides else specs


def apply_steering(
    model: Model,
    steering: SteeringVector | SteeringSpec | Sequence[SteeringSpec],
    *,
    coefficient: float | None = None,
    layers: Sequence[int] | int | None = None,
    positions: str | Positions | None = None,
    mode: str | None = None,
    rows: torch.Tensor | None = None,
) -> HookHandle:
    """Start steering and return a handle; call ``handle.remove()`` to stop.

    `rows`, a bool tensor with one entry per batch row, limits steering to the rows that
    are True at each forward call; it is read, not copied, so changing it in place between
    decoding steps switches steering on or off per row (what the guard does).
    Prefer ``with acteng.steer(...)``, which cannot forget to remove.
    """
    if rows is not None and (rows.dtype != torch.bool or rows.dim() != 1):
        raise ConfigError("rows must be a 1-D bool tensor with one entry per batch row")
    specs = as_specs(steering, coefficient, layers, positions, mode)
    fns: dict[int, list[BlockFn]] = {}
    blocks = model.blocks
    for spec in specs:
        spec.vector.check_compatible(model)
        for layer in spec.active_layers:
            block = blocks[layer]
            param = next(block.parameters(), None)
            device = param.device if param is not None else model.device
            direction = spec.vector[layer].to(device=device, dtype=model.dtype)
            fns.setdefault(layer, []).append(_block_fn(spec, direction, rows))
    track = any(parse_positions(s.positions).kind != "all" for s in specs)
    return attach(model.hf, blocks, fns, track_positions=track)


@contextmanager
def steer(
    model: Model,
    steering: SteeringVector | SteeringSpec | Sequence[SteeringSpec],
    *,
    coefficient: float | None = None,
    layers: Sequence[int] | int | None = None,
    positions: str | Positions | None = None,
    mode: str | None = None,
    rows: torch.Tensor | None = None,
) -> Iterator[HookHandle]:
    """Steer `model` inside a ``with`` block; the hooks are removed on exit, even on error.

    >>> with acteng.steer(model, vector, coefficient=4.0):
    ...     out = model.hf.generate(**inputs, max_new_tokens=32)
    """
    handle = apply_steering(
        model,
        steering,
        coefficient=coefficient,
        layers=layers,
        positions=positions,
        mode=mode,
        rows=rows,
    )
    try:
        yield handle
    finally:
        handle.remove()
