"""Scoring a steering setting: the held-out split, input checks, the memoising `Scorer`,
the budget search, and local against pooled scoring (same cells)."""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import pytest
import torch

import acteng
from acteng.errors import ConfigError, MissingExtraError
from acteng.evaluation.scoring import (
    Cell,
    LocalScoring,
    PooledScoring,
    Scorer,
    bisect_budget,
    check_budget,
    check_coefficients,
    data_frame,
)
from tests.evaluation.grid_data import NEUTRAL, small_pairs

T = TypeVar("T")
R = TypeVar("R")


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_budget_outside_unit_interval_is_refused(budget: float) -> None:
    with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
        check_budget(budget)


def test_coefficients_pass_the_spec_check_and_every_bad_one_is_named() -> None:
    assert check_coefficients([1, 2.5, -4]) == (1.0, 2.5, -4.0)
    with pytest.raises(ConfigError, match=r"\[nan, 1e\+30\].*finite.*\|c\| <= 10000"):
        check_coefficients([1.0, math.nan, 1e30])
    with pytest.raises(ConfigError, match="finite"):
        check_coefficients([])
    with pytest.raises(ConfigError, match=r"\[True\]"):
        check_coefficients([True])  # type: ignore[list-item]


class FakeScorer(Scorer):
    """Tax grows with the coefficient (tax = c / 100), effect = c; no model needed."""

    def __init__(self) -> None:
        self.base_margin, self.base_perplexity, self.base_p_match = 0.5, 10.0, None
        self._seen = {}
        self.scored: list[float] = []

    def score(
        self,
        method: str,
        vector: acteng.SteeringVector,
        layers: Sequence[int],
        coefficient: float,
        *,
        max_tax: float | None = None,
    ) -> Cell:
        key = (method, tuple(layers), coefficient)
        if key not in self._seen:
            self.scored.append(coefficient)
            self._seen[key] = Cell(
                method, tuple(layers), coefficient, coefficient, coefficient / 100
            )
        return self._seen[key]


VECTOR = acteng.SteeringVector({3: torch.ones(4)})


def test_bisect_budget_quarters_down_then_bisects() -> None:
    scorer, seen = FakeScorer(), []
    cells = bisect_budget(scorer, "mean_diff", VECTOR, [3], 16.0, 0.05, 2, seen.append)
    # 16 is over the budget (tax 0.16), a quarter of it fits; then 10 and 7 miss
    assert [c.coefficient for c in cells] == [16.0, 4.0, 10.0, 7.0]
    assert seen == cells
    whole = bisect_budget(scorer, "mean_diff", VECTOR, [3], 2.0, 0.05, 3)
    assert [c.coefficient for c in whole] == [2.0]  # the whole range fits: one cell


class InProcessPool:
    """A pool whose worker is not `here`, so `scoring` would use PooledScoring with it."""

    here = None

    def __init__(self, value: Scorer) -> None:
        self.value = value

    def call_one(self, fn: Callable[[Scorer], R]) -> R:
        return fn(self.value)

    def map(self, fn: Callable[[Scorer, T], R], items: Sequence[T]) -> Iterator[R]:
        return (fn(self.value, item) for item in items)


def test_pooled_scoring_gives_local_scorings_cells() -> None:
    jobs = [("mean_diff", VECTOR, (3,), c, None) for c in (2.0, 4.0, 8.0)]
    searches = [("mean_diff", VECTOR, (3,), 8.0, 0.05, 2)]
    local, pooled = LocalScoring(FakeScorer()), PooledScoring(InProcessPool(FakeScorer()))
    assert (pooled.base_margin, pooled.base_perplexity) == (0.5, 10.0)
    assert list(pooled.score(jobs)) == list(local.score(jobs))
    seen: list[Cell] = []
    here = list(local.search(searches))
    there = list(pooled.search(searches, seen.append))
    assert there == here and seen == there[0]
    # a revisited grid point is the very cell scored before, as in one local scorer
    grid_cell = next(c for c in there[0] if c.coefficient == 8.0)
    assert grid_cell is pooled.known["mean_diff", (3,), 8.0]


def test_data_frame_without_pandas_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real = builtins.__import__

    def no_pandas(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pandas":
            raise ImportError("No module named 'pandas'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(MissingExtraError, match="pip install pandas"):
        data_frame([], ["method"])


@pytest.mark.real
def test_scorer_reports_p_match_for_ab_items(smollm2: acteng.Model) -> None:
    test = acteng.load_pairs("power_seeking", split="test")[:4]
    scorer = Scorer(smollm2, test, NEUTRAL)
    assert scorer.base_p_match is not None and 0 < scorer.base_p_match < 1
    vector = acteng.extract(smollm2, small_pairs("power_seeking"), layers=[10], position="answer")
    cell = scorer.score("mean_diff", vector, [10], 4.0)
    assert cell.p_match is not None and cell.to_json()["p_match"] == cell.p_match


@pytest.mark.real
def test_settings_that_break_the_model_are_recorded_not_chosen(
    smollm2: acteng.Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    from acteng.evaluation import sweep

    data = small_pairs(test=2)
    with pytest.raises(ConfigError, match=r"\|c\| <= 10000"):
        sweep(smollm2, data, layers=[8], coefficients=(1e30,), neutral=NEUTRAL)
    scorer = Scorer(smollm2, data.split("test"), NEUTRAL)
    vector = acteng.extract(smollm2, data.split("train"), layers=[8]) * 1e35
    with pytest.raises(ConfigError, match="norms out of range"):  # refused for steering
        acteng.SteeringSpec(vector, 1.0)
    # Outputs can still overflow (half precision, odd models): let this one through to see
    # that the scorer records such a setting instead of failing or choosing it.
    monkeypatch.setattr("acteng.steering.spec.check_magnitude", lambda *a, **k: None)
    cell = scorer.score("mean_diff", vector, [8], 1e4)  # overflows float32: NaN outputs
    assert not math.isfinite(cell.tax) and not math.isfinite(cell.effect)
    assert not cell.within(1.0) and cell.to_json()["tax"] is None  # JSON null, not NaN
