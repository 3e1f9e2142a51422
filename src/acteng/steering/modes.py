"""Steering modes: each registered by name in `MODES` with its eager function and its table term.

A mode says how a direction v and a coefficient c change the hidden states x:

- ``add``     ``x + c * v``
- ``ablate``  ``x - c * (x . v̂) v̂``: project the direction out (c = 1 removes it fully)
- ``clamp``   set the projection on v̂ to ``c * |v|`` whatever it was

Every executor applies the same modes. `steer` calls the eager function,
``MODES[name](hidden, direction, coefficient) -> hidden``. The per-row executors (the
steering table, eager and compiled, the server's compiled step and the vLLM worker) cannot
call Python per mode inside a fixed or compiled graph; they apply one formula to numbers
held in buffers,

    x' = x + delta + (a - b * (x . u)) * u        (u = v̂)

and each mode says how v and c become those numbers (its `TableTerm`): add is
``delta = c v``; ablate ``b = c``; clamp ``a = c |v|, b = 1``. `register_mode` takes both
parts, so a new mode runs in every executor; one without a table term is refused there,
at registration, rather than by some executors later.

>>> @register_mode("push", term=lambda v, norms, c: TableTerm(delta=c * v / norms[:, None]))
... def push(hidden, direction, coefficient):
...     return hidden + coefficient * direction / direction.norm()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from acteng.errors import ConfigError

__all__ = ["MODES", "Mode", "TableTerm", "mode_named", "register_mode"]


@dataclass(frozen=True)
class TableTerm:
    """A mode's change as the numbers of the table formula ``delta + (a - b * (x . u)) * u``.

    delta: [layers, d]; a, b: [layers] or one number for all layers; None means zero.
    A term whose a and b are both None never reads the projection ``x . u``, so the table
    skips computing it (plain additions cost one add per layer).
    """

    delta: torch.Tensor | None = None
    a: torch.Tensor | float | None = None
    b: torch.Tensor | float | None = None

    @property
    def projects(self) -> bool:
        """Whether the change depends on the hidden state (through ``x . u``)."""
        return self.a is not None or self.b is not None


# eager(hidden [..., d], direction [d], coefficient) -> new hidden [..., d]
EagerFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
# term(directions [layers, d], norms [layers], coefficient) -> the table's numbers
TermFn = Callable[[torch.Tensor, torch.Tensor, float], TableTerm]


@dataclass(frozen=True)
class Mode:
    """One steering mode: `eager` for `steer`, `term` for the per-row executors.

    Calling a mode calls its eager function, so ``MODES[name](x, v, c)`` reads as before.
    """

    name: str
    eager: EagerFn
    term: TermFn

    def __call__(
        self, hidden: torch.Tensor, direction: torch.Tensor, coefficient: float
    ) -> torch.Tensor:
        return self.eager(hidden, direction, coefficient)


MODES: dict[str, Mode] = {}


def register_mode(name: str, *, term: TermFn | None = None) -> Callable[[EagerFn], Mode]:
    """Register the decorated eager function as mode `name`, with its table term.

    `term(directions, norms, coefficient)` gives the `TableTerm` the per-row executors
    apply; it must describe the same change as the eager function (the contract test
    tests/steering/test_modes_contract.py checks the built-in modes for exactly that).
    """
    if term is None:
        raise ConfigError(
            f"mode {name!r} has no table term, so the steering table, the compiled paths "
            "and vLLM could not apply it; pass term=lambda directions, norms, c: "
            "TableTerm(delta=..., a=..., b=...) giving x + delta + (a - b * (x . u)) * u"
        )

    def decorate(fn: EagerFn) -> Mode:
        mode = Mode(name, fn, term)
        MODES[name] = mode
        return mode

    return decorate


def mode_named(name: str) -> Mode:
    """The registered mode `name`; every executor looks modes up here."""
    mode = MODES.get(name)
    if not isinstance(mode, Mode):
        known = ", ".join(k for k, v in MODES.items() if isinstance(v, Mode))
        problem = "is unknown" if mode is None else "was put in MODES without register_mode"
        raise ConfigError(
            f"mode {name!r} {problem}; use one of {known}, or add it with "
            "acteng.register_mode(name, term=...)"
        )
    return mode


def _unit(direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm: torch.Tensor = direction.norm()  # Tensor.norm is untyped in torch
    return direction / norm, norm


@register_mode("add", term=lambda directions, _norms, c: TableTerm(delta=c * directions))
def _add(hidden: torch.Tensor, direction: torch.Tensor, coefficient: float) -> torch.Tensor:
    return hidden + coefficient * direction


@register_mode("ablate", term=lambda _directions, _norms, c: TableTerm(b=c))
def _ablate(hidden: torch.Tensor, direction: torch.Tensor, coefficient: float) -> torch.Tensor:
    unit, _ = _unit(direction)
    projection = hidden @ unit  # [..., pos]
    return hidden - coefficient * projection.unsqueeze(-1) * unit


@register_mode("clamp", term=lambda _directions, norms, c: TableTerm(a=c * norms, b=1.0))
def _clamp(hidden: torch.Tensor, direction: torch.Tensor, coefficient: float) -> torch.Tensor:
    unit, norm = _unit(direction)
    projection = hidden @ unit
    return hidden + (coefficient * norm - projection).unsqueeze(-1) * unit
