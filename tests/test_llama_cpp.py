"""Exported vectors steer llama.cpp (the real engine) the way acteng steers transformers."""

from pathlib import Path

import pytest

import acteng
from tests.llama_cpp_parity import logit_change_correlations

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.mark.parametrize("layer", [10, 15, 20])
def test_llama_cpp_applies_direction_n_at_block_n(
    smollm2: acteng.Model, tmp_path: Path, layer: int
) -> None:
    vector = acteng.extract(smollm2, "sentiment", layers=[layer - 1, layer, layer + 1])
    corr = logit_change_correlations(
        smollm2, vector, layer, 4.0, "Tell me about your weekend.", tmp_path
    )
    assert corr[0] >= 0.95, corr
    assert corr[0] > corr[-1] and corr[0] > corr[1], corr
