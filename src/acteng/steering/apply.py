"""Steering at inference with eager hooks: `apply_steering` and `steer`.

A spec (`acteng.steering.spec`) says which vector, how strong, at which layers, at which
token positions and in which mode (`acteng.steering.modes`). Layer i is the output of block i
(``hidden_states[i + 1]`` in transformers), so steering at layer i changes what every later
block reads. Several specs may be active at once; on a shared layer they apply in the order
given.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from acteng.errors import ConfigError
from acteng.hooks import BlockFn, ForwardContext, HookHandle, attach
from acteng.models import Model
from acteng.positions import Positions, parse_positions
from acteng.steering.modes import MODES, mode_named, register_mode
from acteng.steering.spec import SteeringSpec, as_specs
from acteng.vectors import SteeringVector

__all__ = ["MODES", "SteeringSpec", "apply_steering", "register_mode", "steer"]


def _row_mask(rows: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    if rows.shape != hidden.shape[:1]:
        raise ConfigError(
            f"the steering row gate has {rows.shape[0]} rows but the batch has "
            f"{hidden.shape[0]}; give one bool per batch row"
        )
    return rows.to(hidden.device).view(-1, 1, 1)


def _block_fn(spec: SteeringSpec, direction: torch.Tensor, rows: torch.Tensor | None) -> BlockFn:
    mode, coefficient = mode_named(spec.mode), spec.coefficient
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
    specs = as_specs(steering, coefficient, layers, positions, mode, model=model)
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
    return attach(model.hf, blocks, fns, track_positions=track, steering=True)


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
