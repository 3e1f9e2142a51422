"""Scoring steering settings on a pool of Ray actors (sweeps, tuning).

Each actor loads the model once and builds its own `Scorer` on the same held-out pairs and
neutral text, so the unsteered references, and every cell, are what the local backend
computes. Cells come back in the order they were asked for. A coefficient search is one
task (its steps depend on each other); searches run side by side. Before a search, the
actor takes the grid's cells as scored, as the local scorer would have them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from acteng.backends.local import RayBackend
from acteng.backends.ray import load_on_worker, portable_recipe, ray_cluster, worker_resources
from acteng.evaluation.tuning import Cell, OnCell, ScoreJob, Scorer, SearchJob, _bisect_budget
from acteng.models import Model, ModelRecipe
from acteng.pairs import Pairs

__all__ = ["PoolScoring", "ScoreWorker", "scoring_pool"]


class ScoreWorker:
    """A Ray actor holding the model and a `Scorer` (wrapped by `ray.remote` at use)."""

    def __init__(
        self,
        recipe: ModelRecipe,
        expected_hash: str,
        threads: int,
        held: Pairs,
        neutral: Sequence[str] | None,
    ) -> None:
        self.scorer = Scorer(load_on_worker(recipe, expected_hash, threads), held, neutral)

    def base(self) -> tuple[float, float, float | None]:
        s = self.scorer
        return s.base_margin, s.base_perplexity, s.base_p_match

    def score(self, job: ScoreJob) -> Cell:
        method, vector, layers, coef, max_tax = job
        return self.scorer.score(method, vector, layers, coef, max_tax=max_tax)

    def search(self, job: SearchJob, known: Sequence[Cell]) -> list[tuple[Cell, bool]]:
        """The search's cells, each marked True when it is one of `known` (a cache hit)."""
        self.scorer.remember(known)
        cells = _bisect_budget(self.scorer, *job, None)
        return [(c, any(c is k for k in known)) for c in cells]


class PoolScoring:
    """`acteng.evaluation.tuning.LocalScoring`'s methods, run on a pool of `ScoreWorker` actors."""

    def __init__(self, actors: list[Any]) -> None:
        import ray
        from ray.util import ActorPool

        self.pool = ActorPool(actors)
        self.base_margin, self.base_perplexity, self.base_p_match = ray.get(actors[0].base.remote())
        self.known: dict[tuple[str, tuple[int, ...], float], Cell] = {}

    def score(self, jobs: Sequence[ScoreJob]) -> Iterator[Cell]:
        for cell in self.pool.map(lambda actor, job: actor.score.remote(job), list(jobs)):
            self.known[(cell.method, cell.layers, cell.coefficient)] = cell
            yield cell

    def search(
        self, jobs: Sequence[SearchJob], on_cell: OnCell | None = None
    ) -> Iterator[list[Cell]]:
        known = list(self.known.values())
        results = self.pool.map(lambda actor, job: actor.search.remote(job, known), list(jobs))
        for marked in results:
            # A cache hit is the very cell scored before, as in one local scorer.
            cells = [
                self.known[(c.method, c.layers, c.coefficient)] if hit else c for c, hit in marked
            ]
            if on_cell is not None:
                for cell in cells:
                    on_cell(cell)
            yield cells


@contextmanager
def scoring_pool(
    model: Model, held: Pairs, neutral: Sequence[str] | None, backend: RayBackend
) -> Iterator[PoolScoring]:
    """A pool of scoring actors for the length of the block (killed after it)."""
    import ray

    recipe = portable_recipe(model)
    with ray_cluster(backend) as workers:
        worker = ray.remote(ScoreWorker).options(**worker_resources(backend, recipe))
        actors: list[Any] = [
            worker.remote(recipe, model.content_hash, backend.cpus_per_worker, held, neutral)
            for _ in range(workers)
        ]
        try:
            yield PoolScoring(actors)
        finally:
            for actor in actors:
                ray.kill(actor)
