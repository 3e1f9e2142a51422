"""Recording activations on Ray Data: the driver's batches, run by `record_batch` on workers.

The driver tokenises and plans the batches exactly as the local backend does; each batch
travels to an actor pool as one row, and comes back as the reduced rows of its texts
(``[texts, d_model]`` float32 per layer: what the local backend keeps, and what every
method, `pca` and `probe` included, reduces). The driver places them in input order, so
the methods then run on the same rows as locally, in one code path.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

import numpy as np
import torch

from acteng.activations import RecordBatch, record_batch
from acteng.backends.local import RayBackend
from acteng.backends.ray import load_on_worker, portable_recipe, ray_cluster, worker_resources
from acteng.models import Model, ModelRecipe

__all__ = ["Recorder", "record_on_ray"]

log = logging.getLogger(__name__)


class Recorder:
    """A Ray Data actor: loads the model once, then runs whole batches."""

    def __init__(self, recipe: ModelRecipe, expected_hash: str, threads: int) -> None:
        self.model = load_on_worker(recipe, expected_hash, threads)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts: list[int] = []
        reduced: dict[int, list[torch.Tensor]] = {}
        for blob in rows["batch"]:
            batch: RecordBatch = pickle.loads(blob)
            texts.extend(batch.plan.texts)
            for layer, values in record_batch(self.model, batch).items():
                reduced.setdefault(layer, []).append(values)
        import ray

        node = ray.get_runtime_context().get_node_id()
        out = {"texts": np.asarray(texts, dtype=np.int64), "node": np.asarray([node] * len(texts))}
        for layer, parts in reduced.items():
            out[f"layer_{layer}"] = torch.cat(parts).numpy()
        return out


def record_on_ray(
    model: Model, batches: list[RecordBatch], backend: RayBackend, progress: bool = False
) -> list[tuple[list[int], dict[int, torch.Tensor]]]:
    """Each batch's texts and reduced rows, computed on the cluster's workers."""
    import ray
    import ray.data

    recipe = portable_recipe(model)
    layers = batches[0].layers
    with ray_cluster(backend) as workers:
        context: Any = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        dataset = ray.data.from_items([{"batch": pickle.dumps(b)} for b in batches])
        recorded = dataset.map_batches(
            Recorder,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(batches))),
            fn_constructor_kwargs={
                "recipe": recipe,
                "expected_hash": model.content_hash,
                "threads": backend.cpus_per_worker,
            },
            **worker_resources(backend, recipe),
        )
        results, nodes = [], set[str]()
        for out in recorded.iter_batches(batch_size=None, batch_format="numpy"):
            nodes.update(str(n) for n in out["node"])
            texts = [int(t) for t in out["texts"]]
            rows = {x: torch.from_numpy(np.array(out[f"layer_{x}"])) for x in layers}
            results.append((texts, rows))
    log.info("recorded %d batches with %d workers on %d nodes", len(batches), workers, len(nodes))
    return results
