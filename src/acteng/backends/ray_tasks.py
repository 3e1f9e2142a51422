"""Independent calls that need the model, run side by side on Ray actors (evaluation)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

from acteng.backends.local import RayBackend
from acteng.backends.ray import load_on_worker, portable_recipe, ray_cluster, worker_resources
from acteng.models import Model, ModelRecipe

__all__ = ["ModelWorker", "run_with_model"]


class ModelWorker:
    """A Ray actor holding the model; `call(fn, args)` returns ``fn(model, *args)``."""

    def __init__(self, recipe: ModelRecipe, expected_hash: str, threads: int) -> None:
        self.model = load_on_worker(recipe, expected_hash, threads)

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return fn(self.model, *args)


def run_with_model(
    model: Model, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]], backend: RayBackend
) -> Generator[Any]:
    """Each ``fn(model, *args)`` of `calls` on a pool of actors, results in order."""
    import ray
    from ray.util import ActorPool

    recipe = portable_recipe(model)
    with ray_cluster(backend) as workers:
        worker = ray.remote(ModelWorker).options(**worker_resources(backend, recipe))
        actors: list[Any] = [
            worker.remote(recipe, model.content_hash, backend.cpus_per_worker)
            for _ in range(min(workers, len(calls)))
        ]
        try:
            yield from ActorPool(actors).map(
                lambda actor, call: actor.call.remote(*call), list(calls)
            )
        finally:
            for actor in actors:
                ray.kill(actor)
