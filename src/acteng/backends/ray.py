"""The Ray backend: `map` on Ray Data, `pool` on Ray actors, one actor class for both.

Workers never receive the model object: each `ModelWorker` loads it from its recipe once
(`load_on_worker`, which checks it is the driver's model) and then calls what it is given
with it. `map` sends the items through Ray Data to a pool of these actors and yields the
results in input order; `pool` starts one actor per worker, each holding what the caller's
factory built from the model (a scorer), and kills them when the block ends.

`ray_cluster` attaches to ``RayBackend.address`` or ``$RAY_ADDRESS`` when given, else
starts a local cluster sized to this machine, and disconnects (stopping a cluster it
started) when the block ends, so nothing is left running. Inside a block, or when the
caller already ran ``ray.init``, nested calls reuse the connection.

Caveats: a local cluster takes 5-10 s to start and ~0.6 GB idle; Ray opens about a dozen
ports on all interfaces; the object store gets an explicit small size, since acteng only
moves token ids and reduced rows through it. Ray, numpy and torch are imported only when
work runs, so naming `RayBackend` costs nothing.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from acteng.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    import numpy as np

    from acteng.models import Model, ModelRecipe

__all__ = [
    "LOCAL_OBJECT_STORE_BYTES",
    "ModelWorker",
    "RayBackend",
    "RayPool",
    "load_on_worker",
    "portable_recipe",
    "ray_cluster",
    "worker_resources",
]

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 512 * 1024 * 1024

T = TypeVar("T")
R = TypeVar("R")
W = TypeVar("W")


@dataclass(frozen=True)
class RayBackend:
    """A Ray cluster to run on, and how many workers to use there.

    `address` None attaches to ``$RAY_ADDRESS`` when set, else starts a local cluster sized
    to this machine (stopped again when the call returns). `workers` None uses one worker
    per `cpus_per_worker` CPUs of the cluster. Each worker loads the model once and runs
    torch with `cpus_per_worker` threads.

    >>> vector = acteng.extract(model, "sentiment", backend=RayBackend(workers=4))
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

    @contextmanager
    def session(self) -> Iterator[None]:
        with ray_cluster(self):
            yield

    def map(
        self,
        model: Model,
        fn: Callable[[Model, T], R],
        items: Sequence[T],
        *,
        progress: str | None = None,
    ) -> Generator[R]:
        import numpy as np
        import ray
        import ray.data
        from ray import cloudpickle  # as Ray sends task arguments: closures, mappingproxy

        if not items:
            return
        recipe = portable_recipe(model)
        with ray_cluster(self) as workers:
            size = min(workers, len(items))
            calls = [
                {"call": cloudpickle.dumps((fn, item))}  # type: ignore[no-untyped-call]
                for item in items
            ]
            dataset = ray.data.from_items(calls)
            context: Any = dataset.context  # this dataset's own copy
            context.enable_progress_bars = progress is not None
            context.execution_options.preserve_order = True  # results in input order
            done = dataset.map_batches(
                ModelWorker,
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=size),
                fn_constructor_kwargs={
                    "recipe": recipe,
                    "expected_hash": model.content_hash,
                    "threads": self.cpus_per_worker,
                },
                **worker_resources(self, recipe),
            )
            nodes = set[str]()
            for out in done.iter_batches(batch_size=None, batch_format="numpy"):
                nodes.update(str(n) for n in np.asarray(out["node"]))
                for blob in out["out"]:
                    yield pickle.loads(blob)
        log.info("ran %d items with %d workers on %d nodes", len(items), size, len(nodes))

    @contextmanager
    def pool(self, model: Model, factory: Callable[[Model], W]) -> Iterator[RayPool[W]]:
        import ray

        recipe = portable_recipe(model)
        with ray_cluster(self) as workers:
            worker = ray.remote(ModelWorker).options(**worker_resources(self, recipe))
            actors: list[Any] = [
                worker.remote(recipe, model.content_hash, self.cpus_per_worker, factory)
                for _ in range(workers)
            ]
            try:
                yield RayPool(actors)
            finally:
                for actor in actors:
                    ray.kill(actor)


class ModelWorker:
    """A Ray actor: loads the model once, holds it (or what `factory` builds from it), and
    calls what it is given with that: ``fn(value, item)`` for each pickled ``(fn, item)``
    of a Ray Data batch (`RayBackend.map`), or ``fn(value, *args)`` for a `call` (`RayPool`)."""

    def __init__(
        self,
        recipe: ModelRecipe,
        expected_hash: str,
        threads: int,
        factory: Callable[[Model], Any] | None = None,
    ) -> None:
        model = load_on_worker(recipe, expected_hash, threads)
        self.value: Any = model if factory is None else factory(model)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.value, *args)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np
        import ray
        from ray import cloudpickle

        out = [
            cloudpickle.dumps(self.call(*pickle.loads(blob)))  # type: ignore[no-untyped-call]
            for blob in rows["call"]
        ]
        node = ray.get_runtime_context().get_node_id()
        return {"out": np.array(out, dtype=object), "node": np.asarray([node] * len(out))}


class RayPool(Generic[W]):
    """`ModelWorker` actors taking calls (see `acteng.backends.base.Pool`)."""

    here = None  # the workers live in other processes

    def __init__(self, actors: list[Any]) -> None:
        from ray.util import ActorPool

        self.actors = actors
        self._pool = ActorPool(actors)

    def call_one(self, fn: Callable[[W], R]) -> R:
        import ray

        result: R = ray.get(self.actors[0].call.remote(fn))
        return result

    def map(self, fn: Callable[[W, T], R], items: Sequence[T]) -> Iterator[R]:
        results: Iterator[R] = self._pool.map(
            lambda actor, item: actor.call.remote(fn, item), list(items)
        )
        return results


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
    import torch

    from acteng.models import load_model

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
