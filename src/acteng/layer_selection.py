"""Layer selections: which residual-stream layers a user means, read one way everywhere.

Python calls, CLI flags (``--layers 11-13``) and the ``steering`` and ``monitor`` fields of
HTTP and vLLM requests all go through `parse_layers`, so ``-1`` is the last block and
``"11-13"`` three layers wherever they are written (as `acteng.positions` does for token
positions). Layer ``i`` is the output of block ``i`` (``hidden_states[i + 1]``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Protocol

from acteng.errors import ConfigError

__all__ = ["HasLayers", "layer_numbers", "parse_layers"]


class HasLayers(Protocol):
    """What reading a layer selection needs to know of a model: a `Model`, or the
    `acteng.vllm_engine.requests.ModelShape` that stands for one inside vLLM."""

    @property
    def name(self) -> str: ...

    @property
    def num_layers(self) -> int: ...


def layer_numbers(value: Any) -> tuple[int, ...]:
    """`value`, an int or a non-empty list of whole numbers, as a tuple; each layer once."""
    raw = [value] if _whole(value) else value
    if isinstance(raw, str) or not isinstance(raw, Sequence) or not raw:
        raise ConfigError(f"layers must be a non-empty list of layer numbers, got {value!r}")
    bad = [x for x in raw if not _whole(x)]
    if bad:
        raise ConfigError(f"layers must hold whole numbers, got {bad}")
    return _distinct(tuple(int(x) for x in raw), list(raw))


def _whole(x: object) -> bool:
    # numpy integers count (they register as Integral); True and 8.0 do not
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _distinct(layers: tuple[int, ...], given: object) -> tuple[int, ...]:
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layers {given} repeat a layer; list each layer once")
    return layers


def parse_layers(model: HasLayers, layers: int | str | Sequence[int] | None) -> list[int]:
    """The layers a selection names, checked against `model`, sorted.

    The one reading of a layer selection, the same for Python, CLI flags and the
    ``steering`` field of HTTP and vLLM requests: None or "all" is every layer; an int,
    a list, or a string of numbers "5,7,9", ranges "11-13" and open ranges "2-" name
    layers; negative numbers count from the end (-1 is the last block). Layer i is the
    output of block i. A layer named twice is an error.

    >>> parse_layers(model, "11-13")
    [11, 12, 13]
    >>> parse_layers(model, -1)  # [29] on a 30-layer model
    """
    n = model.num_layers
    if layers is None or layers == "all":
        return list(range(n))
    if isinstance(layers, str):
        chosen: list[int] = []
        for part in layers.replace(" ", "").split(","):
            lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            try:
                if sep:
                    chosen.extend(range(int(lo), (int(hi) if hi else n - 1) + 1))
                else:
                    chosen.append(int(lo))
            except ValueError:
                raise ConfigError(
                    f"cannot read layers {layers!r}; write 'all', '12', '11-13' or '5,7,9'"
                ) from None
        if not chosen:
            raise ConfigError(f"no layers selected by {layers!r}; give at least one layer")
    else:
        chosen = list(layer_numbers(layers))
    resolved = [x + n if x < 0 else x for x in chosen]
    bad = [orig for orig, x in zip(chosen, resolved, strict=True) if not 0 <= x < n]
    if bad:
        raise ConfigError(
            f"layer(s) {bad} out of range: {model.name} has layers 0 to {n - 1}; choose from "
            f"0-{n - 1} (-1 is the last; layer i is the output of block i)"
        )
    return sorted(_distinct(tuple(resolved), layers))
