"""Sweeps and auto-tuning: which method, layer(s) and coefficient steer best within a tax.

Both score a steering setting the same way (`Scorer`), on data the vectors were not fit on:

- **effect**: the mean log-prob margin of positive over negative answers on the held-out
  pairs, steered minus unsteered (nats; for A/B items p(match) is reported too);
- **tax**: the relative perplexity change on the bundled neutral text's test split
  (``steered / unsteered - 1``; 0.05 = 5 % worse).

Vectors for every method and layer come from one recording pass over the training pairs
(`acteng.extraction.extract_many`). `sweep` scores a full methods x layers x coefficients
grid. `tune` scores the single-layer `mean_diff` grid first (the simple baseline it must
match), then, around the best layers, every method on one layer and on a band of three,
each at the largest coefficient the tax budget allows (down by quarters until one fits,
then bisection), and keeps the setting
with the largest effect within the budget. The grid points are candidates too, so the tuned
setting is never worse than the best grid point on the same data. Effects are measured on
the split the choice is made on: an optimistic estimate of the winner's effect (report it
as such), and the same data for every candidate.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from acteng.activations import parse_layers
from acteng.backends.local import Backend, RayBackend, connected, resolve_backend
from acteng.errors import ConfigError, DataError
from acteng.evaluation.metrics import ab_from_scores, pair_scores
from acteng.evaluation.tax import load_eval, perplexity
from acteng.extraction import extract_many
from acteng.models import Model
from acteng.pairs import Pairs, load_pairs
from acteng.steering.spec import MAX_ABS_COEFFICIENT, SteeringSpec
from acteng.vectors import SteeringVector

__all__ = ["Cell", "Scorer", "SweepResult", "TuneResult", "held_out", "sweep", "tune"]

DEFAULT_COEFFICIENTS = (1.0, 2.0, 4.0, 8.0)
OnCell = Callable[["Cell"], None]


def held_out(dataset: Pairs) -> tuple[Pairs, Pairs]:
    """(fit, held-out) pairs: the dataset's own train/test split, or every fifth pair held
    out when it has none. Both parts need enough pairs to mean something."""
    if any(p.split == "test" for p in dataset):
        fit, test = dataset.split("train"), dataset.split("test")
    else:
        fit = Pairs(tuple(p for i, p in enumerate(dataset) if i % 5 != 4), name=dataset.name)
        test = Pairs(tuple(p for i, p in enumerate(dataset) if i % 5 == 4), name=dataset.name)
    if len(fit) < 2 or len(test) < 1:
        raise DataError(
            f"dataset {dataset.name!r} has {len(fit)} pairs to fit and {len(test)} to hold out; "
            "tuning needs at least 2 and 1 (give more pairs, or mark some 'split': 'test')"
        )
    if any(p.prompt is None for p in test):
        raise DataError(
            f"dataset {dataset.name!r} has pairs without a 'prompt': the effect is measured "
            "as the log-prob margin of positive over negative answers to prompts (use pairs "
            "with a 'prompt', or CAA A/B items)"
        )
    if all(p.positive == p.negative for p in fit):
        raise DataError(
            f"dataset {dataset.name!r}: every pair's positive equals its negative, so there "
            "is no contrast to learn; the two sides must differ in the concept"
        )
    return fit, test


def check_budget(max_tax: float) -> float:
    if not isinstance(max_tax, (int, float)) or not 0.0 < max_tax <= 1.0:
        raise ConfigError(
            f"the tax budget must be in (0, 1] (a relative perplexity increase: 0.05 = 5 %), "
            f"got {max_tax!r}"
        )
    return float(max_tax)


def check_coefficients(coefficients: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(c) for c in coefficients)
    bad = [c for c in values if not math.isfinite(c)]
    if not values or bad:
        raise ConfigError(
            f"coefficients must be finite numbers, got {list(coefficients)!r}; e.g. 1,2,4,8"
        )
    huge = [c for c in values if abs(c) > MAX_ABS_COEFFICIENT]
    if huge:
        raise ConfigError(
            f"coefficient(s) {huge} are not usable; give finite numbers with "
            f"|c| <= {MAX_ABS_COEFFICIENT:g}"
        )
    return values


@dataclass(frozen=True)
class Cell:
    """One scored setting. `effect`/`tax` are NaN when steering made the outputs
    non-finite; `effect` is NaN too when the setting was over the budget and its effect
    was not measured (tuning skips those)."""

    method: str
    layers: tuple[int, ...]
    coefficient: float
    effect: float
    tax: float
    p_match: float | None = None

    def within(self, max_tax: float) -> bool:
        return math.isfinite(self.effect) and math.isfinite(self.tax) and self.tax <= max_tax

    def to_json(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        out: dict[str, Any] = {
            "method": self.method,
            "layers": list(self.layers),
            "coefficient": self.coefficient,
            "effect": num(self.effect),
            "tax": num(self.tax),
        }
        if self.p_match is not None:
            out["p_match"] = num(self.p_match)
        return out


class Scorer:
    """Effect and perplexity tax of steering settings on fixed held-out data, with the
    unsteered references computed once."""

    def __init__(self, model: Model, held: Pairs, neutral: Sequence[str] | None = None) -> None:
        self.model = model
        self.held = held
        self.neutral = (
            list(neutral) if neutral is not None else load_eval("neutral_text", split="test")
        )
        self.ab = all(p.ab for p in held)
        self.base_perplexity = perplexity(model, self.neutral)
        self.base_margin, self.base_p_match = self._behaviour(None)
        self._seen: dict[tuple[str, tuple[int, ...], float], Cell] = {}

    def _behaviour(self, spec: SteeringSpec | None) -> tuple[float, float | None]:
        """Mean margin and (A/B items) mean p(match), from one scoring pass."""
        scores = pair_scores(self.model, self.held, spec)
        margin = statistics.fmean(pos - neg for pos, neg in scores)
        if not self.ab:
            return margin, None
        return margin, statistics.fmean(p for p, _ in ab_from_scores(scores))

    def tax(self, spec: SteeringSpec) -> float:
        value = perplexity(self.model, self.neutral, spec) / self.base_perplexity - 1.0
        return value if math.isfinite(value) else math.nan

    def score(
        self,
        method: str,
        vector: SteeringVector,
        layers: Sequence[int],
        coefficient: float,
        *,
        max_tax: float | None = None,
    ) -> Cell:
        """Score `coefficient * vector` at `layers`; with `max_tax`, a setting over the
        budget is not measured further (its effect is NaN)."""
        key = (method, tuple(layers), coefficient)
        seen = self._seen.get(key)
        if seen is not None and (
            math.isfinite(seen.effect)
            or not math.isfinite(seen.tax)
            or (max_tax is not None and seen.tax > max_tax)
        ):
            return seen  # scored already (a bisection often revisits a grid point)
        spec = SteeringSpec(vector, coefficient=coefficient, layers=tuple(layers))
        tax = seen.tax if seen is not None else self.tax(spec)
        if max_tax is not None and not (tax <= max_tax):
            cell = Cell(method, tuple(layers), coefficient, math.nan, tax)
        else:
            effect, p_match = math.nan, None
            if math.isfinite(tax):
                margin, p_match = self._behaviour(spec)
                effect = margin - self.base_margin if math.isfinite(margin) else math.nan
            cell = Cell(method, tuple(layers), coefficient, effect, tax, p_match)
        self._seen[key] = cell
        return cell

    def remember(self, cells: Sequence[Cell]) -> None:
        """Take `cells` as scored already (what another scorer of the same data found)."""
        for cell in cells:
            self._seen[(cell.method, cell.layers, cell.coefficient)] = cell


# What scores cells: (method, vector, layers, coefficient, max_tax) for one cell, and
# (method, vector, layers, high, max_tax, steps) for one coefficient search.
ScoreJob = tuple[str, SteeringVector, tuple[int, ...], float, float | None]
SearchJob = tuple[str, SteeringVector, tuple[int, ...], float, float, int]


class Scoring(Protocol):
    """What sweeps and tuning score with: `LocalScoring` here, or a pool of Ray actors
    (`acteng.backends.ray_scoring.PoolScoring`). Cells come back in the order asked for."""

    base_margin: float
    base_perplexity: float
    base_p_match: float | None

    def score(self, jobs: Sequence[ScoreJob]) -> Iterator[Cell]: ...

    def search(
        self, jobs: Sequence[SearchJob], on_cell: OnCell | None = None
    ) -> Iterator[list[Cell]]: ...


class LocalScoring:
    """Scores in this process, one cell after another."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.base_margin, self.base_perplexity = scorer.base_margin, scorer.base_perplexity
        self.base_p_match = scorer.base_p_match

    def score(self, jobs: Sequence[ScoreJob]) -> Iterator[Cell]:
        for method, vector, layers, coef, max_tax in jobs:
            yield self.scorer.score(method, vector, layers, coef, max_tax=max_tax)

    def search(
        self, jobs: Sequence[SearchJob], on_cell: OnCell | None = None
    ) -> Iterator[list[Cell]]:
        for job in jobs:
            yield _bisect_budget(self.scorer, *job, on_cell)


@contextmanager
def _scoring(
    model: Model, held: Pairs, neutral: Sequence[str] | None, ray: RayBackend | None
) -> Iterator[Scoring]:
    if ray is None:
        yield LocalScoring(Scorer(model, held, neutral))
        return
    from acteng.backends.ray_scoring import scoring_pool

    with scoring_pool(model, held, neutral, ray) as pool:
        yield pool


def _best(cells: Sequence[Cell], max_tax: float) -> Cell | None:
    eligible = [c for c in cells if c.within(max_tax)]
    return max(eligible, key=lambda c: (c.effect, -c.tax), default=None)


@dataclass
class SweepResult:
    """Every scored cell of a sweep, with the unsteered references."""

    dataset: dict[str, Any]
    methods: tuple[str, ...]
    layers: tuple[int, ...]
    coefficients: tuple[float, ...]
    base_margin: float
    base_perplexity: float
    base_p_match: float | None
    cells: list[Cell] = field(default_factory=list)
    complete: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "methods": list(self.methods),
            "layers": list(self.layers),
            "coefficients": list(self.coefficients),
            "unsteered": {
                "margin": self.base_margin,
                "perplexity": self.base_perplexity,
                "p_match": self.base_p_match,
            },
            "complete": self.complete,
            "cells": [c.to_json() for c in self.cells],
        }

    def grid(self, method: str, what: str) -> list[list[float | None]]:
        """Rows = layers, columns = coefficients; None where a cell was not scored."""
        found = {(c.layers[0], c.coefficient): c for c in self.cells if c.method == method}
        out: list[list[float | None]] = []
        for layer in self.layers:
            row: list[float | None] = []
            for coef in self.coefficients:
                cell = found.get((layer, coef))
                value = None if cell is None else getattr(cell, what)
                if value is not None and what == "tax":
                    value = 100.0 * value
                row.append(value)
            out.append(row)
        return out


def _prepare(
    model: Model,
    pairs: Pairs | str | Path | Sequence[Any],
    methods: Sequence[str],
    layers: int | str | Sequence[int] | None,
    position: str,
    ray: RayBackend | None = None,
) -> tuple[Pairs, Pairs, list[int], dict[str, SteeringVector]]:
    """The dataset, its held-out part, the layers asked for, and a vector per method fit at
    every layer (one recording pass; neighbours of the chosen layers are there for bands)."""
    dataset = load_pairs(pairs)
    fit, test = held_out(dataset)
    chosen = parse_layers(model, layers)
    vectors = extract_many(model, fit, list(methods), None, position, backend=ray or "local")
    return dataset, test, chosen, vectors


def sweep(
    model: Model,
    pairs: Pairs | str | Path | Sequence[Any],
    *,
    methods: Sequence[str] = ("mean_diff",),
    layers: int | str | Sequence[int] | None = None,
    coefficients: Sequence[float] = DEFAULT_COEFFICIENTS,
    position: str = "last",
    on_cell: OnCell | None = None,
    result: SweepResult | None = None,
    neutral: Sequence[str] | None = None,
    backend: Backend = "local",
) -> SweepResult:
    """Score every method x layer x coefficient (see the module docstring).

    Pass a `result` to collect cells into (a caller that may be interrupted keeps what was
    scored); `on_cell` is called after each cell, e.g. to save progress. `neutral` texts
    replace the bundled neutral text for the tax (e.g. text from your own domain).
    `backend` ``"ray"`` extracts on Ray Data and scores the cells on a pool of Ray actors;
    the cells come back in the same order with the same values.
    """
    coefs = check_coefficients(coefficients)
    ray = resolve_backend(backend)
    with connected(ray):
        dataset, test, chosen, vectors = _prepare(model, pairs, methods, layers, position, ray)
        with _scoring(model, test, neutral, ray) as scoring:
            out = result if result is not None else SweepResult({}, (), (), (), 0.0, 0.0, None)
            out.dataset, out.methods = dataset.provenance(), tuple(methods)
            out.layers, out.coefficients = tuple(chosen), coefs
            out.base_margin, out.base_perplexity = scoring.base_margin, scoring.base_perplexity
            out.base_p_match = scoring.base_p_match
            jobs: list[ScoreJob] = [
                (method, vectors[method], (layer,), coef, None)
                for method in methods
                for layer in chosen
                for coef in coefs
            ]
            for cell in scoring.score(jobs):
                out.cells.append(cell)
                if on_cell is not None:
                    on_cell(cell)
    out.complete = True
    return out


@dataclass
class TuneResult:
    """The chosen setting (`vector` holds only its layers) and everything scored."""

    vector: SteeringVector
    method: str
    layers: tuple[int, ...]
    coefficient: float
    effect: float
    tax: float
    p_match: float | None
    max_tax: float
    grid_best: Cell | None
    base_margin: float
    base_perplexity: float
    base_p_match: float | None
    candidates: list[Cell]
    fitted: dict[str, SteeringVector] = field(default_factory=dict)  # every method, layer

    def to_json(self, vector_path: str | Path | None = None) -> dict[str, Any]:
        return {
            "vector": str(vector_path) if vector_path is not None else None,
            "method": self.method,
            "layers": list(self.layers),
            "coefficient": self.coefficient,
            "effect": self.effect,
            "tax": self.tax,
            "p_match": self.p_match,
            "max_tax": self.max_tax,
            "unsteered": {
                "margin": self.base_margin,
                "perplexity": self.base_perplexity,
                "p_match": self.base_p_match,
            },
            "selected_on": self.vector.metadata.get("tuning", {}).get("selected_on"),
            "grid_best": self.grid_best.to_json() if self.grid_best else None,
            "candidates": [c.to_json() for c in self.candidates],
        }


def _bisect_budget(
    scorer: Scorer,
    method: str,
    vector: SteeringVector,
    layers: Sequence[int],
    high: float,
    max_tax: float,
    steps: int,
    on_cell: OnCell | None,
) -> list[Cell]:
    """Cells along a search for the largest coefficient in (0, high] within budget: down
    by quarters until one fits (a vector with a large norm may need a coefficient far
    below the grid), then `steps` bisections between the last fit and the first miss."""
    cells: list[Cell] = []

    def score(coef: float) -> Cell:
        cell = scorer.score(method, vector, layers, coef, max_tax=max_tax)
        cells.append(cell)
        if on_cell is not None:
            on_cell(cell)
        return cell

    coef, low = high, 0.0
    for _ in range(8):
        if score(coef).tax <= max_tax:
            low = coef
            break
        high, coef = coef, coef / 4
    if low == 0.0 or low == high:
        return cells  # nothing fits, or the whole range does
    for _ in range(steps):
        coef = (low + high) / 2
        if score(coef).tax <= max_tax:
            low = coef
        else:
            high = coef
    return cells


def tune(
    model: Model,
    pairs: Pairs | str | Path | Sequence[Any],
    *,
    max_tax: float = 0.05,
    methods: Sequence[str] = ("mean_diff", "pca", "probe"),
    layers: int | str | Sequence[int] | None = None,
    coefficients: Sequence[float] = DEFAULT_COEFFICIENTS,
    position: str = "last",
    refine_layers: int = 1,
    bisection_steps: int = 3,
    on_cell: OnCell | None = None,
    neutral: Sequence[str] | None = None,
    backend: Backend = "local",
) -> TuneResult:
    """Choose method, layer(s) and coefficient (see the module docstring); `neutral`
    texts replace the bundled neutral text for the tax. `backend` ``"ray"`` scores the
    grid cells, then each coefficient search, on a pool of Ray actors: same choice."""
    budget = check_budget(max_tax)
    coefs = tuple(sorted({c for c in check_coefficients(coefficients) if c > 0}))
    if not coefs:
        raise ConfigError("tuning needs positive coefficients (the direction toward 'positive')")
    wanted = list(dict.fromkeys(["mean_diff", *methods]))
    ray = resolve_backend(backend)
    with connected(ray):
        _, test, chosen, vectors = _prepare(model, pairs, wanted, layers, position, ray)
        with _scoring(model, test, neutral, ray) as scoring:
            return _tune(
                scoring,
                test,
                chosen,
                vectors,
                wanted,
                coefs,
                budget,
                refine_layers,
                bisection_steps,
                on_cell,
            )


def _tune(
    scoring: Scoring,
    test: Pairs,
    chosen: list[int],
    vectors: dict[str, SteeringVector],
    wanted: list[str],
    coefs: tuple[float, ...],
    budget: float,
    refine_layers: int,
    bisection_steps: int,
    on_cell: OnCell | None,
) -> TuneResult:
    grid: list[Cell] = []
    jobs: list[ScoreJob] = [
        ("mean_diff", vectors["mean_diff"], (layer,), coef, budget)
        for layer in chosen
        for coef in coefs
    ]
    for cell in scoring.score(jobs):
        grid.append(cell)
        if on_cell is not None:
            on_cell(cell)
    grid_best = _best(grid, budget)

    # Refine around the layers whose best grid point is strongest (or, when nothing fits
    # the budget, whose smallest coefficient costs least).
    def layer_rank(layer: int) -> tuple[float, float]:
        mine = [c for c in grid if c.layers == (layer,)]
        best = _best(mine, budget)
        return (best.effect if best else -math.inf, -min(c.tax for c in mine))

    top = sorted(chosen, key=layer_rank, reverse=True)[: max(refine_layers, 0)]
    searches: list[SearchJob] = []
    for layer in top:
        over = [c.coefficient for c in grid if c.layers == (layer,) and not c.tax <= budget]
        high = min(over) if over else 2 * coefs[-1]
        bands: list[tuple[int, ...]] = [(layer,)]
        band = tuple(
            x for x in (layer - 1, layer, layer + 1) if x in vectors["mean_diff"].directions
        )
        if len(band) > 1:
            bands.append(band)
        for method in wanted:
            for band_layers in bands:
                searches.append(
                    (method, vectors[method], band_layers, high, budget, bisection_steps)
                )
    refined = [cell for cells in scoring.search(searches, on_cell) for cell in cells]
    candidates = list(dict.fromkeys(grid + refined))  # the scorer returns repeats as is
    best = _best(candidates, budget)
    if best is None:
        smallest = min(grid, key=lambda c: c.tax if math.isfinite(c.tax) else math.inf)
        if not math.isfinite(smallest.tax):
            raise ConfigError(
                f"no setting stayed within a perplexity tax of {100 * budget:g} %: every "
                "coefficient made the model's outputs non-finite; use smaller --coefficients"
            )
        raise ConfigError(
            f"no setting stayed within a perplexity tax of {100 * budget:g} % (the smallest "
            f"grid tax was {100 * smallest.tax:.1f} % at layer {smallest.layers[0]}, "
            f"coefficient {smallest.coefficient:g}); allow a larger --max-tax or try smaller "
            "--coefficients"
        )
    chosen_vector = vectors[best.method].select(list(best.layers))
    metadata = dict(chosen_vector.metadata)
    metadata["tuning"] = {
        "coefficient": best.coefficient,
        "layers": list(best.layers),
        "effect": best.effect,
        "tax": best.tax,
        "max_tax": budget,
        "selected_on": test.provenance(),
        "effect_measure": "mean log-prob margin shift (nats) on the held-out pairs",
        "tax_measure": "relative perplexity change on acteng's neutral_text test split",
    }
    return TuneResult(
        vector=SteeringVector(chosen_vector.directions, metadata),
        method=best.method,
        layers=best.layers,
        coefficient=best.coefficient,
        effect=best.effect,
        tax=best.tax,
        p_match=best.p_match,
        max_tax=budget,
        grid_best=grid_best,
        base_margin=scoring.base_margin,
        base_perplexity=scoring.base_perplexity,
        base_p_match=scoring.base_p_match,
        candidates=candidates,
        fitted=vectors,
    )
