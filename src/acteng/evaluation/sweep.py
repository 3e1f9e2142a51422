"""Sweeps: score every method x layer x coefficient (see `acteng.evaluation.scoring`).

Vectors for every method and layer come from one recording pass over the training pairs
(`acteng.extraction.extract_many`); each cell is then scored on the held-out pairs, or on
a separate test set (`acteng.evaluation.splits`). Bare pairs (no prompt) are measured as
the assistant's answer to a neutral user turn (`metrics.BARE_PROMPT`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acteng.backends import Backend, BackendChoice, resolve_backend
from acteng.evaluation.scoring import (
    DEFAULT_COEFFICIENTS,
    Cell,
    OnCell,
    ScoreJob,
    check_coefficients,
    data_frame,
    scoring,
)
from acteng.evaluation.splits import effect_measure, fit_and_test
from acteng.extraction import extract_many
from acteng.layer_selection import parse_layers
from acteng.models import Model
from acteng.pairs import Pairs, load_pairs
from acteng.vectors import SteeringVector

if TYPE_CHECKING:
    import pandas

__all__ = ["SweepResult", "prepare_grid", "sweep"]


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
    measured_on: dict[str, Any] = field(default_factory=dict)  # the pairs the effect is on

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "measured_on": self.measured_on,
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

    def to_pandas(self) -> pandas.DataFrame:
        """One row per scored cell: method, layer, coefficient, effect, tax (NaN where not
        finite), p_match (NaN unless the pairs are A/B items). Needs pandas.

        >>> frame = acteng.evaluation.sweep(model, "sentiment", layers="6-10").to_pandas()
        >>> frame.pivot(index="layer", columns="coefficient", values="effect")
        """
        columns = ["method", "layer", "coefficient", "effect", "tax", "p_match"]
        rows = [
            {
                "method": c.method,
                "layer": c.layers[0],
                "coefficient": c.coefficient,
                "effect": c.effect,
                "tax": c.tax,
                "p_match": math.nan if c.p_match is None else c.p_match,
            }
            for c in self.cells
        ]
        return data_frame(rows, columns)

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


def prepare_grid(
    model: Model,
    pairs: Pairs | str | Path | Sequence[Any],
    methods: Sequence[str],
    layers: int | str | Sequence[int] | None,
    position: str,
    backend: Backend,
    test: Pairs | str | Path | Sequence[Any] | None = None,
) -> tuple[Pairs, Pairs, list[int], dict[str, SteeringVector]]:
    """The dataset, the pairs to measure on (its held-out part, or `test`: see
    `fit_and_test`), the layers asked for, and a vector per method fit at every layer (one
    recording pass reads them all; only the layers asked for are scored, bands included)."""
    dataset = load_pairs(pairs)
    fit, test = fit_and_test(dataset, test)
    chosen = parse_layers(model, layers)
    vectors = extract_many(model, fit, list(methods), None, position, backend=backend)
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
    backend: BackendChoice = "local",
    test: Pairs | str | Path | Sequence[Any] | None = None,
) -> SweepResult:
    """Score every method x layer x coefficient (see `acteng.evaluation.scoring` for the
    effect and the tax).

    Pass a `result` to collect cells into (a caller that may be interrupted keeps what was
    scored); `on_cell` is called after each cell, e.g. to save progress. `neutral` texts
    replace the bundled neutral text for the tax (e.g. text from your own domain). With a
    `test` set (a file, a bundled name or pairs), the vectors are fit on every pair of
    `pairs` and the effect is measured on `test` (its test split when it marks one) instead
    of the held-out part; bare and prompted pairs may be mixed across the two, not within.
    `backend` ``"ray"`` extracts on Ray Data and scores the cells on a pool of Ray actors;
    the cells come back in the same order with the same values.

    >>> result = acteng.evaluation.sweep(model, "sentiment", layers="6-10")
    >>> best = max(result.cells, key=lambda c: c.effect)
    """
    coefs = check_coefficients(coefficients)
    runner = resolve_backend(backend)
    with runner.session():
        dataset, measured, chosen, vectors = prepare_grid(
            model, pairs, methods, layers, position, runner, test
        )
        with scoring(model, measured, neutral, runner) as scored:
            out = result if result is not None else SweepResult({}, (), (), (), 0.0, 0.0, None)
            out.dataset, out.methods = dataset.provenance(), tuple(methods)
            out.measured_on = {
                **measured.provenance(),
                "effect_measure": effect_measure(measured, test is not None),
            }
            out.layers, out.coefficients = tuple(chosen), coefs
            out.base_margin, out.base_perplexity = scored.base_margin, scored.base_perplexity
            out.base_p_match = scored.base_p_match
            jobs: list[ScoreJob] = [
                (method, vectors[method], (layer,), coef, None)
                for method in methods
                for layer in chosen
                for coef in coefs
            ]
            for cell in scored.score(jobs):
                out.cells.append(cell)
                if on_cell is not None:
                    on_cell(cell)
    out.complete = True
    return out
