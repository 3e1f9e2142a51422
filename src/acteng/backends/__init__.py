"""Where the heavy loops run: ``"local"`` (this process) or ``"ray"`` (a Ray cluster).

`record_activations`, `extract`, `sweep`, `tune` and `evaluate` take ``backend="local"``
(the default), ``backend="ray"``, a `acteng.RayBackend` to choose the cluster and the
workers, or any `Backend`. They call `resolve_backend` and then only the `Backend`
interface (`acteng.backends.base`); `resolve_backend` is the one place that reaches the
Ray implementation (`acteng.backends.ray`), lazily, and Ray itself is imported only when
Ray work runs.

>>> vector = acteng.extract(model, "sentiment", layers=[12], backend="ray")
>>> vector = acteng.extract(model, "sentiment", backend=acteng.RayBackend(workers=4))
"""

from __future__ import annotations

import importlib.util

from acteng.backends.base import Backend, Pool
from acteng.backends.local import LocalBackend
from acteng.errors import ConfigError, missing_extra

__all__ = ["BACKENDS", "Backend", "BackendChoice", "LocalBackend", "Pool", "resolve_backend"]

BACKENDS = ("local", "ray")

# What a `backend=` argument takes: a name of BACKENDS, or a backend itself.
BackendChoice = str | Backend


def resolve_backend(backend: BackendChoice) -> Backend:
    """The backend a `backend=` argument names, checking that Ray is installed for Ray."""
    if backend == "local" or isinstance(backend, LocalBackend):
        return LocalBackend()
    from acteng.backends.ray import RayBackend  # light: Ray itself loads when work runs

    if isinstance(backend, str):
        if backend != "ray":
            raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        backend = RayBackend()
    if not isinstance(backend, Backend):
        raise ConfigError(
            f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)} or a RayBackend"
        )
    if isinstance(backend, RayBackend) and importlib.util.find_spec("ray") is None:
        raise missing_extra("ray", "ray", purpose="backend 'ray'")
    return backend
