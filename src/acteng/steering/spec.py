"""`SteeringSpec`: one steering operation as a value (vector, coefficient, layers, positions,
mode), the same in Python, HTTP and the CLI, and its checks.

Its one JSON form is `SteeringSpec.to_json` / `SteeringSpec.from_json`::

    {"vector": NAME, "coefficient": 4.0, "layers": [8], "positions": "all", "mode": "add"}

HTTP requests, the server's echo of the steering it applied, vLLM ``extra_args`` and the
CLI's ``--json`` output all read and write it. Layers there mean what
`acteng.layer_selection.parse_layers` says (``-1`` is the last block, ``"11-13"`` three
layers), coefficients what `check_coefficient` says.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from acteng.errors import ConfigError, RequestError
from acteng.layer_selection import HasLayers, layer_numbers, parse_layers
from acteng.positions import Positions, parse_positions
from acteng.steering.modes import MODES
from acteng.vectors import SteeringVector, check_magnitude

__all__ = ["JSON_FIELDS", "MAX_ABS_COEFFICIENT", "SteeringSpec", "as_specs", "check_coefficient"]

# The keys of a spec's JSON form; `from_json` refuses any other.
JSON_FIELDS = ("vector", "coefficient", "layers", "positions", "mode")

# Coefficients beyond this are almost surely a typo (activations would overflow).
MAX_ABS_COEFFICIENT = 1e4


def check_coefficient(
    value: Any, *, name: str = "coefficient", bound: float = MAX_ABS_COEFFICIENT
) -> float:
    """`value` as a float if it is a usable steering coefficient, else a ConfigError.

    The one coefficient check: specs, HTTP and vLLM requests and sweeps all call it, so a
    coefficient means the same and fails with the same words everywhere. `name` is what
    the message calls the value (an HTTP field path, say); `bound` caps ``|value|``.

    >>> check_coefficient(4)
    4.0
    >>> check_coefficient(float("nan"))  # ConfigError: ... give a finite number ...
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or abs(number) > bound:
        raise ConfigError(
            f"{name} is {value}; give a finite number between {-bound:g} and {bound:g}"
        )
    return number


@dataclass(frozen=True)
class SteeringSpec:
    """One steering operation; the same value in Python, HTTP and CLI.

    `layers` None means every layer of the vector; `positions` is ``all``, ``prompt``,
    ``generated`` or a window ``"start:end"``. `name` is the vector's name (or path) as
    the user wrote it: `to_json` writes it, `from_json` sets it; it is not compared.

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
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.vector, SteeringVector):
            raise ConfigError(
                f"a steering spec needs a SteeringVector, got {type(self.vector).__name__}; "
                "load one with acteng.SteeringVector.load(path)"
            )
        object.__setattr__(self, "coefficient", check_coefficient(self.coefficient))
        # norms that overflow float32 would turn steering into NaN or silent zeros
        check_magnitude(self.vector, source="the steering vector")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        object.__setattr__(self, "positions", parse_positions(self.positions))
        if self.layers is not None:
            layers = layer_numbers(self.layers)
            missing = [x for x in layers if x not in self.vector.directions]
            if missing:
                # A spec knows no model, so it cannot count from the model's end.
                negative = (
                    "; negative layers count from the model's last block: pass them to "
                    "steer(model, ..., layers=...) or SteeringSpec.from_json(..., model)"
                    if any(x < 0 for x in missing)
                    else ""
                )
                raise ConfigError(
                    f"layer(s) {missing} are not in the vector (it has "
                    f"{list(self.vector.layers)}); choose layers the vector was extracted at"
                    + negative
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

    def to_json(self) -> dict[str, Any]:
        """The spec's JSON form, which `from_json` reads back: layers as the list of layer
        numbers steered, positions as text.

        >>> SteeringSpec(vector, 4.0, (12,), name="happy").to_json()
        {'vector': 'happy', 'coefficient': 4.0, 'layers': [12], 'positions': 'all', 'mode': 'add'}
        """
        if self.name is None:
            raise ConfigError(
                "this spec has no vector name to write as JSON; build it with "
                "SteeringSpec(vector, ..., name='NAME') or dataclasses.replace(spec, name=...)"
            )
        return {
            "vector": self.name,
            "coefficient": self.coefficient,
            "layers": list(self.active_layers),
            "positions": str(self.positions),
            "mode": self.mode,
        }

    @classmethod
    def from_json(
        cls,
        obj: Any,
        lookup: Callable[[str], SteeringVector],
        model: HasLayers,
        *,
        where: str = "spec",
        max_coefficient: float = MAX_ABS_COEFFICIENT,
    ) -> SteeringSpec:
        """A spec from its JSON form, each field checked, `RequestError` on any problem.

        `lookup` turns the ``vector`` name into a vector (the server's library resolver,
        or `acteng.load_vector`); its own errors pass through. Layers are read against
        `model` by `parse_layers`. Error messages and `RequestError.param` name the field
        under `where` (``steering[0].layers``); `max_coefficient` caps ``|coefficient|``.

        >>> load = lambda name: acteng.load_vector(name, model=model)
        >>> SteeringSpec.from_json({"vector": "happy", "layers": -1}, load, model).layers
        (29,)
        """
        if not isinstance(obj, dict):
            raise RequestError(
                f'{where} must be an object like {{"vector": "name", "coefficient": 4}}', where
            )
        unknown = sorted(set(obj) - set(JSON_FIELDS))
        if unknown:
            raise RequestError(
                f"{where} has unknown field(s) {unknown}; use {', '.join(JSON_FIELDS)}", where
            )
        if "vector" not in obj:
            raise RequestError(f"{where}.vector is missing: name a library vector", where)
        name = obj["vector"]
        if not isinstance(name, str):
            raise RequestError(
                f"{where}.vector must be a vector name (a string), got {name!r}", f"{where}.vector"
            )
        vector = lookup(name)
        param = f"{where}.coefficient"
        try:
            coefficient = check_coefficient(
                obj.get("coefficient", 1.0), name=param, bound=max_coefficient
            )
        except ConfigError as exc:
            raise RequestError(str(exc), param) from exc
        layers = None
        if obj.get("layers") is not None:
            try:
                layers = tuple(parse_layers(model, obj["layers"]))
            except ConfigError as exc:
                raise RequestError(f"{where}.layers: {exc}", f"{where}.layers") from exc
        mode = obj.get("mode", "add")
        if not isinstance(mode, str) or mode not in MODES:
            raise RequestError(
                f"{where}.mode {mode!r} is unknown; use one of {', '.join(MODES)}", f"{where}.mode"
            )
        positions = obj.get("positions", "all")
        if not isinstance(positions, str):
            raise RequestError(
                f"{where}.positions must be 'all', 'prompt', 'generated' or 'start:end'",
                f"{where}.positions",
            )
        try:
            return cls(vector, coefficient, layers, positions, mode, name=name)
        except ConfigError as exc:
            raise RequestError(f"{where}: {exc}", where) from exc


def as_specs(
    steering: SteeringVector | SteeringSpec | Sequence[SteeringSpec],
    coefficient: float | None,
    layers: Sequence[int] | int | None,
    positions: str | Positions | None,
    mode: str | None,
    *,
    model: HasLayers | None = None,
) -> list[SteeringSpec]:
    """The specs `steer` would apply for these arguments (overrides applied to each).

    With `model`, a `layers` override is read by `parse_layers` (``-1``, ``"11-13"``).
    """
    overrides: dict[str, Any] = {
        k: v
        for k, v in (("coefficient", coefficient), ("positions", positions), ("mode", mode))
        if v is not None
    }
    if layers is not None and model is not None:
        overrides["layers"] = tuple(parse_layers(model, layers))
    elif layers is not None:
        overrides["layers"] = (layers,) if isinstance(layers, int) else tuple(layers)
    if isinstance(steering, SteeringVector):
        return [SteeringSpec(steering, **overrides)]
    if not isinstance(steering, SteeringSpec | list | tuple):
        raise ConfigError(
            f"steer takes a SteeringVector or SteeringSpecs, got {type(steering).__name__}; "
            "wrap a raw direction as acteng.SteeringVector({layer: tensor}, {})"
        )
    specs = [steering] if isinstance(steering, SteeringSpec) else list(steering)
    bad = [type(s).__name__ for s in specs if not isinstance(s, SteeringSpec)]
    if bad:
        raise ConfigError(f"steer takes a SteeringVector or SteeringSpecs, got {bad}")
    if not specs:
        raise ConfigError("nothing to steer with: pass a vector or at least one spec")
    return [replace(s, **overrides) for s in specs] if overrides else specs
