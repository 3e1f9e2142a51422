"""Reliability: per-example steerability and pre-steering pair diagnostics."""

from __future__ import annotations

import pytest
import torch

import acteng
from acteng.errors import ConfigError
from acteng.evaluation.metrics import logprob_margin
from acteng.evaluation.reliability import pair_diagnostics, steerability
from acteng.steering.spec import SteeringSpec
from tests.helpers import random_vector


def test_slopes_are_least_squares_fits(tiny_llama: acteng.Model) -> None:
    pairs = acteng.load_pairs("sentiment", split="test")[:3]
    vector = random_vector(tiny_llama, [1], scale=2.0)
    result = steerability(tiny_llama, pairs, vector, coefficients=(-1.0, 0.0, 2.0))
    assert len(result.slopes) == 3 and len(result.propensities[0]) == 3
    # the middle column is the unsteered margin
    assert [row[1] for row in result.propensities] == pytest.approx(
        logprob_margin(tiny_llama, pairs)
    )
    at_two = logprob_margin(tiny_llama, pairs, SteeringSpec(vector, coefficient=2.0))
    assert [row[2] for row in result.propensities] == pytest.approx(at_two)
    x = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    for row, slope in zip(result.propensities, result.slopes, strict=True):
        y = torch.tensor(row, dtype=torch.float64)
        expected = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        assert slope == pytest.approx(expected)
    assert 0.0 <= result.anti_steerable <= 1.0 and result.to_json()["spread"] >= 0
    with pytest.raises(ConfigError, match="two different coefficients"):
        steerability(tiny_llama, pairs, vector, coefficients=(1.0, 1.0))


def test_diagnostics_follow_their_definitions(tiny_llama: acteng.Model) -> None:
    pairs = acteng.load_pairs("sentiment", split="test")[:6]
    [diag] = pair_diagnostics(tiny_llama, pairs, [2])
    assert diag.layer == 2 and -1 <= diag.consistency <= 1 and 0 <= diag.auroc <= 1
    with pytest.raises(ConfigError, match="at least 2 pairs"):
        pair_diagnostics(tiny_llama, pairs[:1], [2])


@pytest.mark.real
def test_sentiment_steers_reliably_on_the_real_model(smollm2: acteng.Model) -> None:
    vector = acteng.extract(smollm2, "sentiment", layers=[8])
    test = acteng.load_pairs("sentiment", split="test")[:12]
    result = steerability(smollm2, test, vector, coefficients=(-4.0, 0.0, 4.0))
    # on average it steers, and most examples move the right way (at layer 8, c = +-4, a
    # third of these pairs are anti-steerable: the spread Tan et al. warn about)
    assert result.mean > 0 and result.anti_steerable < 0.5, result.to_json()
    [diag] = pair_diagnostics(smollm2, acteng.load_pairs("sentiment", split="train"), [8])
    assert diag.consistency > 0.2 and diag.auroc > 0.9 and diag.cohens_d > 1
