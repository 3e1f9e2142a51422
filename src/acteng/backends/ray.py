"""Attaching to a Ray cluster (or starting a local one) and loading the model on workers.

`ray_cluster` attaches to ``RayBackend.address`` or ``$RAY_ADDRESS`` when given, else
starts a local cluster sized to this machine, and disconnects (stopping a cluster it
started) when the block ends, so nothing is left running. Inside a block, or when the
caller already ran ``ray.init``, nested calls reuse the connection.

Caveats: a local cluster takes 5-10 s to start and ~0.6 GB idle; Ray opens about a dozen
ports on all interfaces; the object store gets an explicit small size, since acteng only
moves token ids and reduced rows through it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from acteng.backends.local import RayBackend
from acteng.errors import ConfigError, ModelLoadError
from acteng.models import Model, ModelRecipe, load_model

__all__ = [
    "LOCAL_OBJECT_STORE_BYTES",
    "load_on_worker",
    "portable_recipe",
    "ray_cluster",
    "worker_resources",
]

LOCAL_OBJECT_STORE_BYTES = 512 * 1024 * 1024


@contextmanager
def ray_cluster(backend: RayBackend) -> Iterator[int]:
    """Connect for the length of the block; yields how many workers to use."""
    import ray

    connected_here = False
    if not ray.is_initialized():
        address = backend.address or os.environ.get("RAY_ADDRESS") or None
        if address is not None and address.startswith("ray://"):
            RayBackend(address=address)  # raises the Ray Client error
        options: dict[str, Any] = {"logging_level": logging.WARNING}
        if address is None:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            options.update(
                num_cpus=os.cpu_count() or 1,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                include_dashboard=False,
            )
        ray.init(address=address, **options)
        connected_here = True
    try:
        resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
        cpus = int(resources.get("CPU", 1))
        yield backend.workers or max(1, cpus // backend.cpus_per_worker)
    finally:
        if connected_here:
            ray.shutdown()


def portable_recipe(model: Model) -> ModelRecipe:
    """The model's recipe with local paths made absolute (workers start elsewhere)."""
    recipe = model.recipe
    if recipe is None:
        raise ConfigError(
            f"model {model.name!r} has no recipe (it was not loaded by acteng.load_model), "
            "so Ray workers cannot load it; load it with acteng.load_model(source, ...)"
        )

    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path is not None and Path(path).exists() else path

    return replace(recipe, source=absolute(recipe.source), adapter=absolute(recipe.adapter))


def load_on_worker(recipe: ModelRecipe, expected_hash: str, threads: int) -> Model:
    """Load the recipe's model in a worker, with `threads` torch threads, and check it is the
    driver's model (the same file must be at the same path on every node)."""
    torch.set_num_threads(threads)
    model = load_model(
        recipe.source, adapter=recipe.adapter, dtype=recipe.dtype, device=recipe.device
    )
    if model.content_hash != expected_hash:
        raise ModelLoadError(
            f"the worker on {os.uname().nodename} loaded {recipe.source or 'the default model'} "
            f"with hash {model.content_hash}, but the driver's is {expected_hash}; put the "
            "same model files at the same path on every node"
        )
    return model


def worker_resources(backend: RayBackend, recipe: ModelRecipe) -> dict[str, Any]:
    """What one worker reserves: its CPUs, and a GPU when the model runs on one."""
    return {
        "num_cpus": float(backend.cpus_per_worker),
        "num_gpus": 1.0 if recipe.device.startswith("cuda") else 0.0,
    }
