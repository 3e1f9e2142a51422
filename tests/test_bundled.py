"""Bundled detectors and vectors: resolvable by name, and rebuilt exactly by their recipes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

import acteng
from acteng.bundled import bundled_files
from acteng.errors import IncompatibleVectorError
from acteng.library import load_vector
from acteng.optimization import optimize_vector
from acteng.recipes import RECIPES, recipe_data, recipe_provenance
from tests.helpers import check_rebuild

# Rebuilds longer than a few minutes run only with ACTENG_REBUILD=1 (tests/conftest.py);
# the provenance test below checks every file's recipe and data on every run.
LONG = {"harmful_request", "harmful_request_documents", "prompt_injection", "refusal"}


def test_every_recipe_ships_a_file() -> None:
    assert sorted(bundled_files()) == sorted(RECIPES)


def _differences(expected: Any, found: Any, where: str = "") -> list[str]:
    """Where `found` differs from `expected` (mappings compared on `expected`'s keys)."""
    if isinstance(expected, Mapping) and isinstance(found, Mapping):
        return [
            d
            for key, value in expected.items()
            for d in _differences(value, found.get(key), f"{where}.{key}")
        ]
    return [] if expected == found else [f"{where}: recipe {expected!r}, file {found!r}"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_files_record_todays_recipe_and_data(name: str) -> None:
    """A shipped file built from other data (any pair or clean text changed) or other
    settings (layers, method, L2, pooling, seed, target rate) fails here without a model;
    rebuild it with scripts/build_bundled."""
    assert _differences(recipe_provenance(name), load_vector(name).metadata) == []


# The prompt_injection rebuild (about a quarter of a million tokens recorded and fitted)
# takes nearly as long as the other three together: it has a file of its own,
# tests/test_bundled_prompt_injection.py, so the test workers (whole files each) can
# run it beside these instead of after them.
@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=[pytest.mark.rebuild] if n in LONG else [])
        for n in sorted(set(RECIPES) - {"prompt_injection"})
    ],
)
def test_shipped_files_are_what_the_recipes_build(smollm2: acteng.Model, name: str) -> None:
    """The shipped files are what the recipe makes from the team's data, not hand-made."""
    check_rebuild(smollm2, name)


@pytest.mark.real
def test_refusal_recipe_starts_where_the_shipped_one_did(smollm2: acteng.Model) -> None:
    """The refusal recipe's first optimisation step, run for real, meets the same loss the
    shipped file recorded: same model, pairs, tokenisation and seeded batch."""
    recipe = RECIPES["refusal"]
    pairs, _ = recipe_data("refusal")
    step = optimize_vector(
        smollm2, pairs, recipe["layer"], steps=1, lr=recipe["lr"], seed=recipe["seed"]
    )
    shipped = load_vector("refusal", model=smollm2).metadata["optimization"]
    assert step.metadata["optimization"]["first_loss"] == pytest.approx(
        shipped["first_loss"], rel=1e-4
    )


def test_bundled_files_refuse_another_model(tiny_llama: acteng.Model) -> None:
    with pytest.raises(IncompatibleVectorError):
        load_vector("refusal", model=tiny_llama)


def test_harmful_request_documents_fits_each_clean_train_document_once() -> None:
    """Its recipe fits the prompt-injection train documents' clean sides as harmless text,
    one per document (a document's pairs differ by one line), never an injected side or
    a test document."""
    from acteng.held_out import shared_text_groups

    _, clean = recipe_data("harmful_request_documents")
    train = acteng.load_pairs("prompt_injection", split="train")
    assert set(clean) <= {p.negative for p in train}
    assert not set(clean) & {p.positive for p in acteng.load_pairs("prompt_injection")}
    groups = shared_text_groups([p.negative for p in train])
    assert len(clean) == len(set(groups)) == len(set(clean))


def test_a_clean_set_with_an_unknown_side_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from acteng.errors import ConfigError

    recipe = {**RECIPES["harmful_request"], "clean": [{"pairs": "prompt_injection", "side": "x"}]}
    monkeypatch.setitem(RECIPES, "harmful_request_documents", recipe)
    with pytest.raises(ConfigError, match="side must be 'positive' or 'negative'"):
        recipe_data("harmful_request_documents")
