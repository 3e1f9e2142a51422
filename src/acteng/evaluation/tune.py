"""Auto-tuning: which method, layer(s) and coefficient steer best within a tax budget.

Settings are scored as in a sweep (`acteng.evaluation.scoring`). `tune` scores the
single-layer `mean_diff` grid first (the simple baseline it must match), then, around the
best layers, every method on one layer and on a band of three (its neighbours among the
layers asked for, so none with non-adjacent layers), each at the largest
coefficient the tax budget allows (down by quarters until one fits, then bisection:
`bisect_budget`), and keeps the setting with the largest effect within the budget. The
grid points are candidates too, so the tuned setting is never worse than the best grid
point on the same data. Effects are measured on the split the choice is made on: an
optimistic estimate of the winner's effect (report it as such), and the same data for
every candidate. With a separate `test` set the effect is measured there instead
(`acteng.evaluation.splits`); bare pairs (no prompt) are measured as the assistant's answer
to the neutral user turn `metrics.BARE_PROMPT`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acteng.backends import BackendChoice, resolve_backend
from acteng.errors import ConfigError
from acteng.evaluation.scoring import (
    DEFAULT_COEFFICIENTS,
    Cell,
    OnCell,
    ScoreJob,
    Scoring,
    SearchJob,
    check_budget,
    check_coefficients,
    data_frame,
    scoring,
)
from acteng.evaluation.splits import effect_measure
from acteng.evaluation.sweep import prepare_grid
from acteng.models import Model
from acteng.pairs import Pairs
from acteng.vectors import SteeringVector

if TYPE_CHECKING:
    import pandas

__all__ = ["TuneResult", "tune"]


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
            "effect_measure": self.vector.metadata.get("tuning", {}).get("effect_measure"),
            "grid_best": self.grid_best.to_json() if self.grid_best else None,
            "candidates": [c.to_json() for c in self.candidates],
        }

    def to_pandas(self) -> pandas.DataFrame:
        """One row per searched setting (every candidate, grid points first): method,
        layers (a tuple), coefficient, effect and tax (NaN where not measured or not
        finite), p_match (NaN unless A/B items), within_budget, and chosen (True on the
        tuned setting's row). Needs pandas.

        >>> frame = acteng.evaluation.tune(model, "sentiment").to_pandas()
        >>> frame[frame.within_budget].sort_values("effect")
        """
        columns = ["method", "layers", "coefficient", "effect", "tax", "p_match"]
        columns += ["within_budget", "chosen"]
        chosen = (self.method, self.layers, self.coefficient)
        rows = [
            {
                "method": c.method,
                "layers": c.layers,
                "coefficient": c.coefficient,
                "effect": c.effect,
                "tax": c.tax,
                "p_match": math.nan if c.p_match is None else c.p_match,
                "within_budget": c.within(self.max_tax),
                "chosen": (c.method, c.layers, c.coefficient) == chosen,
            }
            for c in self.candidates
        ]
        return data_frame(rows, columns)


def _best(cells: Sequence[Cell], max_tax: float) -> Cell | None:
    eligible = [c for c in cells if c.within(max_tax)]
    return max(eligible, key=lambda c: (c.effect, -c.tax), default=None)


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
    backend: BackendChoice = "local",
    test: Pairs | str | Path | Sequence[Any] | None = None,
) -> TuneResult:
    """Choose method, layer(s) and coefficient (see the module docstring); `neutral`
    texts replace the bundled neutral text for the tax. `backend` ``"ray"`` scores the
    grid cells, then each coefficient search, on a pool of Ray actors: same choice. With
    a `test` set (a file, a bundled name or pairs), the vectors are fit on every pair of
    `pairs` and the choice is made on `test` (its test split when it marks one).

    >>> best = acteng.evaluation.tune(model, "sentiment", max_tax=0.05)
    >>> best.vector.save("tuned.safetensors")
    """
    budget = check_budget(max_tax)
    coefs = tuple(sorted({c for c in check_coefficients(coefficients) if c > 0}))
    if not coefs:
        raise ConfigError("tuning needs positive coefficients (the direction toward 'positive')")
    wanted = list(dict.fromkeys(["mean_diff", *methods]))
    runner = resolve_backend(backend)
    with runner.session():
        _, measured, chosen, vectors = prepare_grid(
            model, pairs, wanted, layers, position, runner, test
        )
        with scoring(model, measured, neutral, runner) as scored:
            return _tune(
                scored,
                measured,
                effect_measure(measured, test is not None),
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
    scored: Scoring,
    test: Pairs,
    measure: str,
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
    for cell in scored.score(jobs):
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
        # only layers the caller allowed (the vectors hold every recorded layer)
        band = tuple(x for x in (layer - 1, layer, layer + 1) if x in chosen)
        if len(band) > 1:
            bands.append(band)
        for method in wanted:
            for band_layers in bands:
                searches.append(
                    (method, vectors[method], band_layers, high, budget, bisection_steps)
                )
    refined = [cell for cells in scored.search(searches, on_cell) for cell in cells]
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
        "effect_measure": measure,
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
        base_margin=scored.base_margin,
        base_perplexity=scored.base_perplexity,
        base_p_match=scored.base_p_match,
        candidates=candidates,
        fitted=vectors,
    )
