"""`SteeringSpec`: one steering operation as a value (vector, coefficient, layers, positions,
mode), the same in Python, HTTP and the CLI, and its checks.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from acteng.errors import ConfigError
from acteng.positions import Positions, parse_positions
from acteng.steering.modes import MODES
from acteng.vectors import SteeringVector

__all__ = ["MAX_ABS_COEFFICIENT", "SteeringSpec", "as_specs", "check_coefficient"]

# Coefficients beyond this are almost surely a typo (activations would overflow).
MAX_ABS_COEFFICIENT = 1e4


def check_coefficient(coefficient: float) -> float:
    """A steering coefficient as a float: a real number, finite, |c| <= MAX_ABS_COEFFICIENT."""
    if isinstance(coefficient, bool) or not isinstance(coefficient, numbers.Real):
        raise ConfigError(f"coefficient must be a number, got {coefficient!r}")
    if not math.isfinite(coefficient) or abs(coefficient) > MAX_ABS_COEFFICIENT:
        raise ConfigError(
            f"coefficient {coefficient} is not usable; give a finite number with "
            f"|c| <= {MAX_ABS_COEFFICIENT:g}"
        )
    return float(coefficient)


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
        object.__setattr__(self, "coefficient", check_coefficient(self.coefficient))
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
