"""Bundled detectors and vectors: resolvable by name, and rebuilt exactly by their recipes."""

from __future__ import annotations

import pytest
import torch

import acteng
from acteng.bundled import bundled_files
from acteng.detectors import Detector, load_detector
from acteng.errors import IncompatibleVectorError
from acteng.library import load_vector
from acteng.recipes import RECIPES, build_bundled


def test_every_recipe_ships_a_file() -> None:
    assert sorted(bundled_files()) == sorted(RECIPES)


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_files_are_what_the_recipes_build(smollm2: acteng.Model, name: str) -> None:
    """The shipped files are what the recipe makes from the team's data, not hand-made."""
    shipped = load_vector(name, model=smollm2)
    built = build_bundled(smollm2, name)
    rebuilt = built.directions if isinstance(built, Detector) else built
    assert shipped.layers == rebuilt.layers
    for x in shipped.layers:
        cosine = torch.nn.functional.cosine_similarity(
            shipped[x].double(), rebuilt[x].double(), dim=0
        )
        assert float(cosine) > 0.999, (x, float(cosine))
        assert float(shipped[x].norm()) == pytest.approx(float(rebuilt[x].norm()), rel=1e-2)
    assert shipped.metadata["name"] == name
    if isinstance(built, Detector):
        det = load_detector(name, model=smollm2)
        assert det.region == built.region
        assert det.pooling == built.pooling
        assert det.threshold == pytest.approx(built.threshold, abs=1e-3)
        assert det.calibration == pytest.approx(built.calibration)


def test_bundled_files_refuse_another_model(tiny_llama: acteng.Model) -> None:
    with pytest.raises(IncompatibleVectorError):
        load_vector("refusal", model=tiny_llama)
