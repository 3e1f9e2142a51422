"""Bundled detectors and vectors: resolvable by name, and rebuilt exactly by their recipes."""

from __future__ import annotations

import pytest

import acteng
from acteng.bundled import bundled_files
from acteng.errors import IncompatibleVectorError
from acteng.library import load_vector
from acteng.recipes import RECIPES
from tests.helpers import check_rebuild


def test_every_recipe_ships_a_file() -> None:
    assert sorted(bundled_files()) == sorted(RECIPES)


# The prompt_injection rebuild (about a quarter of a million tokens recorded and fitted)
# takes nearly as long as the other three together: it has a file of its own,
# tests/test_bundled_prompt_injection.py, so the test workers (whole files each) can
# run it beside these instead of after them.
@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(RECIPES) - {"prompt_injection"}))
def test_shipped_files_are_what_the_recipes_build(smollm2: acteng.Model, name: str) -> None:
    """The shipped files are what the recipe makes from the team's data, not hand-made."""
    check_rebuild(smollm2, name)


def test_bundled_files_refuse_another_model(tiny_llama: acteng.Model) -> None:
    with pytest.raises(IncompatibleVectorError):
        load_vector("refusal", model=tiny_llama)
