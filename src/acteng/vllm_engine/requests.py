"""The ``steering`` field as vLLM carries it: checked, resolved, and turned into a cache salt.

A request names library vectors exactly as in ``acteng serve``::

    SamplingParams(extra_args={"steering": [{"vector": "happy", "coefficient": 4.0}]})

vLLM's own OpenAI server only passes flat values in ``vllm_xargs``, so the list may also
come as a JSON string (``vllm_xargs={"steering": json.dumps([...])}``). Each item is
`SteeringSpec`'s JSON form, read by `SteeringSpec.from_json` through the server's
`acteng.server.requests.parse_steering`, so names, coefficients, layers and modes are
checked by the same code and with the same messages as the transformers engine; the
canonical echo (`SteeringSpec.to_json`) is what the workers read again.

Nothing here imports vLLM: the plugin hands in the model's shape (`ModelShape`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from acteng.errors import RequestError
from acteng.library import VectorLibrary
from acteng.models import Model
from acteng.server.requests import Limits, parse_steering
from acteng.server.resolve import Resolver
from acteng.steering.spec import SteeringSpec

__all__ = ["EXTRA_KEY", "ModelShape", "ParsedSteering", "parse_extra_args", "resolver_for"]

EXTRA_KEY = "steering"
# Where the vector library lives for the vLLM processes (they inherit the environment).
HOME_ENV = "ACTENG_HOME"


@dataclass(frozen=True)
class ModelShape:
    """What steering needs to know about the served model (vLLM has no acteng `Model`)."""

    name: str
    num_layers: int
    hidden_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class ParsedSteering:
    """A request's steering: the specs, their canonical echo and the prefix-cache salt."""

    specs: tuple[SteeringSpec, ...]
    echo: list[dict[str, Any]]
    salt: str


def resolver_for(shape: ModelShape, home: str | None = None) -> Resolver:
    """The server's `Resolver` over the vector library, for a model known by its shape."""
    # Resolver and parse_steering read only name, num_layers, hidden_size, device and
    # dtype from the model, which ModelShape provides.
    return Resolver(cast(Model, shape), VectorLibrary(home or os.environ.get(HOME_ENV)))


def _salt(specs: tuple[SteeringSpec, ...], echo: list[dict[str, Any]]) -> str:
    """A digest of what the steering does: the echo and the vectors' numbers used."""
    digest = hashlib.sha256(json.dumps(echo, sort_keys=True).encode())
    for spec in specs:
        for layer in spec.active_layers:
            digest.update(spec.vector[layer].detach().to("cpu", torch.float32).numpy().tobytes())
    return "acteng-steering:" + digest.hexdigest()[:32]


def parse_extra_args(
    extra_args: Mapping[str, Any] | None,
    shape: ModelShape,
    *,
    home: str | None = None,
    limits: Limits | None = None,
) -> ParsedSteering | None:
    """The steering of one request, or None when it asks for none.

    Raises `RequestError` (a `ValueError`) naming the field and the fix, like the HTTP
    server does.
    """
    if not extra_args or extra_args.get(EXTRA_KEY) in (None, [], ""):
        return None
    value = extra_args[EXTRA_KEY]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RequestError(
                f"steering is a string but not JSON ({exc}); send a list like "
                '[{"vector": "name", "coefficient": 4}]',
                param="steering",
            ) from exc
    specs = tuple(parse_steering(value, "steering", resolver_for(shape, home), limits or Limits()))
    if not specs:
        return None
    echo = [spec.to_json() for spec in specs]
    return ParsedSteering(specs, echo, _salt(specs, echo))
