"""Where the heavy loops run: ``"local"`` (this process) or ``"ray"`` (a Ray cluster).

`record_activations`, `extract`, `sweep`, `tune` and `evaluate` take ``backend="local"``
(the default), ``backend="ray"``, or a `RayBackend` to choose the cluster and the workers.
Nothing here imports Ray; `acteng.scaleout` does, only when a Ray backend is used.

>>> vector = acteng.extract(model, "sentiment", layers=[12], backend="ray")
>>> vector = acteng.extract(model, "sentiment", backend=RayBackend(workers=4))
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from acteng.errors import ConfigError, missing_extra

__all__ = ["BACKENDS", "Backend", "RayBackend", "connected", "resolve_backend"]

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class RayBackend:
    """A Ray cluster to run on, and how many workers to use there.

    `address` None attaches to ``$RAY_ADDRESS`` when set, else starts a local cluster sized
    to this machine (stopped again when the call returns). `workers` None uses one worker
    per `cpus_per_worker` CPUs of the cluster. Each worker loads the model once and runs
    torch with `cpus_per_worker` threads.
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker < 1:
            raise ConfigError(f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        if self.address is not None and self.address.startswith("ray://"):
            raise ConfigError(
                f"cannot run through Ray Client ({self.address!r}): Ray Data does not work "
                "over it; run acteng on the head node (address 'auto' or the GCS address "
                "host:6379) or submit it as a Ray Job"
            )


Backend = str | RayBackend


def resolve_backend(backend: Backend) -> RayBackend | None:
    """None for the local backend, a `RayBackend` for Ray (checking Ray is installed)."""
    if isinstance(backend, RayBackend):
        chosen = backend
    elif backend == "local":
        return None
    elif backend == "ray":
        chosen = RayBackend()
    else:
        raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if importlib.util.find_spec("ray") is None:
        raise missing_extra("ray", "ray", purpose="backend 'ray'")
    return chosen


@contextmanager
def connected(ray: RayBackend | None) -> Iterator[None]:
    """Hold one Ray connection for a block of work (nothing for the local backend), so
    the steps inside share it instead of each starting a cluster."""
    if ray is None:
        yield
        return
    from acteng.backends.ray import ray_cluster

    with ray_cluster(ray):
        yield
