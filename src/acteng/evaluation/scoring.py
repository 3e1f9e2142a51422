"""Scoring steering settings: what sweeps and tuning measure, and where they measure it.

A setting is scored on data the vectors were not fit on (`acteng.evaluation.splits`: the
held-out part of the dataset, or a separate test set):

- **effect**: the mean log-prob margin of positive over negative answers on the held-out
  pairs, steered minus unsteered (nats; for A/B items p(match) is reported too). Each side
  is scored as the assistant's answer to the pair's prompt through the chat template; a
  bare pair (no prompt) answers a neutral user turn (`metrics.BARE_PROMPT`). So for prompted
  pairs the effect is how far steering moves the answer to a question, for bare pairs how
  far it moves what the model says when free to say anything.
- **tax**: the relative perplexity change on the bundled neutral text's test split
  (``steered / unsteered - 1``; 0.05 = 5 % worse).

`Scorer` computes the unsteered references once and remembers every cell it scored.
`scoring` gives a `Scoring` on a backend: in this process (`LocalScoring`) or on a pool of
workers that each build their own `Scorer` on the same data (`PooledScoring`), so every
cell is what the local scorer computes. A coefficient search (`bisect_budget`) is one job:
its steps depend on each other.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from acteng.backends import Backend, Pool
from acteng.errors import ConfigError, MissingExtraError
from acteng.evaluation.metrics import ab_from_scores, pair_scores
from acteng.evaluation.tax import load_eval, perplexity
from acteng.models import Model
from acteng.pairs import Pairs
from acteng.steering.spec import MAX_ABS_COEFFICIENT, SteeringSpec, check_coefficient
from acteng.vectors import SteeringVector

if TYPE_CHECKING:
    import pandas

__all__ = [
    "DEFAULT_COEFFICIENTS",
    "Cell",
    "LocalScoring",
    "OnCell",
    "PooledScoring",
    "ScoreJob",
    "Scorer",
    "Scoring",
    "SearchJob",
    "bisect_budget",
    "check_budget",
    "check_coefficients",
    "data_frame",
    "scoring",
]

DEFAULT_COEFFICIENTS = (1.0, 2.0, 4.0, 8.0)
OnCell = Callable[["Cell"], None]


def check_budget(max_tax: float) -> float:
    if not isinstance(max_tax, (int, float)) or not 0.0 < max_tax <= 1.0:
        raise ConfigError(
            f"the tax budget must be in (0, 1] (a relative perplexity increase: 0.05 = 5 %), "
            f"got {max_tax!r}"
        )
    return float(max_tax)


def check_coefficients(coefficients: Sequence[float]) -> tuple[float, ...]:
    """The coefficients as floats, each passing `SteeringSpec`'s check; names every bad one."""
    values: list[float] = []
    bad: list[Any] = []
    for coefficient in coefficients:
        try:
            values.append(check_coefficient(coefficient))
        except ConfigError:
            bad.append(coefficient)
    if bad or not values:
        raise ConfigError(
            f"coefficient(s) {bad or list(coefficients)!r} are not usable; give finite numbers "
            f"with |c| <= {MAX_ABS_COEFFICIENT:g}, e.g. 1,2,4,8"
        )
    return tuple(values)


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


def data_frame(rows: list[dict[str, Any]], columns: list[str]) -> pandas.DataFrame:
    """`rows` as a pandas DataFrame with these columns, even when there are no rows (what
    the results' ``to_pandas()`` return)."""
    try:
        import pandas
    except ImportError:
        raise MissingExtraError(
            "to_pandas() needs the package 'pandas', which is not installed; install it "
            "with: pip install pandas"
        ) from None
    return pandas.DataFrame(rows, columns=columns)


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


def bisect_budget(
    scorer: Scorer,
    method: str,
    vector: SteeringVector,
    layers: Sequence[int],
    high: float,
    max_tax: float,
    steps: int,
    on_cell: OnCell | None = None,
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


# What scores cells: (method, vector, layers, coefficient, max_tax) for one cell, and
# (method, vector, layers, high, max_tax, steps) for one coefficient search.
ScoreJob = tuple[str, SteeringVector, tuple[int, ...], float, float | None]
SearchJob = tuple[str, SteeringVector, tuple[int, ...], float, float, int]


class Scoring(Protocol):
    """What sweeps and tuning score with. Cells come back in the order asked for."""

    base_margin: float
    base_perplexity: float
    base_p_match: float | None

    def score(self, jobs: Sequence[ScoreJob]) -> Iterator[Cell]: ...

    def search(
        self, jobs: Sequence[SearchJob], on_cell: OnCell | None = None
    ) -> Iterator[list[Cell]]: ...


class LocalScoring:
    """Scores with one `Scorer` in this process, one cell after another (`on_cell` is
    called as each cell of a search is scored)."""

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
            yield bisect_budget(self.scorer, *job, on_cell)


def _references(scorer: Scorer) -> tuple[float, float, float | None]:
    return scorer.base_margin, scorer.base_perplexity, scorer.base_p_match


def _score_job(scorer: Scorer, job: ScoreJob) -> Cell:
    method, vector, layers, coef, max_tax = job
    return scorer.score(method, vector, layers, coef, max_tax=max_tax)


def _search_job(scorer: Scorer, job: SearchJob, known: Sequence[Cell]) -> list[tuple[Cell, bool]]:
    """The search's cells, each marked True when it is one of `known` (a cache hit)."""
    scorer.remember(known)
    cells = bisect_budget(scorer, *job)
    return [(c, any(c is k for k in known)) for c in cells]


class PooledScoring:
    """`LocalScoring`'s methods on a pool of workers, each holding its own `Scorer` of the
    same data. Before a search, a worker takes the cells scored so far as scored, as one
    local scorer would have them; `on_cell` is called once each search is done."""

    def __init__(self, pool: Pool[Scorer]) -> None:
        self.pool = pool
        self.base_margin, self.base_perplexity, self.base_p_match = pool.call_one(_references)
        self.known: dict[tuple[str, tuple[int, ...], float], Cell] = {}

    def score(self, jobs: Sequence[ScoreJob]) -> Iterator[Cell]:
        for cell in self.pool.map(_score_job, jobs):
            self.known[(cell.method, cell.layers, cell.coefficient)] = cell
            yield cell

    def search(
        self, jobs: Sequence[SearchJob], on_cell: OnCell | None = None
    ) -> Iterator[list[Cell]]:
        known = list(self.known.values())
        for marked in self.pool.map(partial(_search_job, known=known), jobs):
            # A cache hit is the very cell scored before, as in one local scorer.
            cells = [
                self.known[(c.method, c.layers, c.coefficient)] if hit else c for c, hit in marked
            ]
            if on_cell is not None:
                for cell in cells:
                    on_cell(cell)
            yield cells


@contextmanager
def scoring(
    model: Model, held: Pairs, neutral: Sequence[str] | None, backend: Backend
) -> Iterator[Scoring]:
    """A `Scoring` of `held` on `backend` for the length of the block."""
    with backend.pool(model, partial(Scorer, held=held, neutral=neutral)) as pool:
        scorer = pool.here
        yield LocalScoring(scorer) if scorer is not None else PooledScoring(pool)
