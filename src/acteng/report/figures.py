"""The project's figures: domain charts built on `acteng.report.svg`, shared by the CLI
(`sweep`, `tune`, `analyze`) and the demo report, so one question is always drawn one way."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from acteng.report.svg import PALETTE, Series, heatmap, xy_chart

__all__ = [
    "cosine_heatmap",
    "frontier_chart",
    "grid_heatmap",
    "readability_chart",
    "scatter_chart",
    "slopes_chart",
]


def frontier_chart(cells: Sequence[Any], name: str, max_tax: float | None) -> str:
    """Effect against tax for every scored `acteng.evaluation.tuning.Cell`, per method, with the
    Pareto frontier and the budget."""
    scored = [c for c in cells if math.isfinite(c.effect) and math.isfinite(c.tax)]
    frontier, best = [], -math.inf
    for c in sorted(scored, key=lambda c: (c.tax, -c.effect)):
        if c.effect > best:
            frontier.append((100 * c.tax, c.effect))
            best = c.effect
    # the frontier line first, so every method's markers stay visible on top of it
    series = [Series("Pareto frontier", frontier, color="#999999", markers=False)]
    for k, method in enumerate(dict.fromkeys(c.method for c in scored)):
        points = [(100 * c.tax, c.effect) for c in scored if c.method == method]
        series.append(Series(method, points, lines=False, color=PALETTE[k % len(PALETTE)]))
    vlines = [(100 * max_tax, f"budget {100 * max_tax:g} %")] if max_tax is not None else []
    return xy_chart(
        series,
        title=f"{name}: effect against tax (each point one setting)",
        xlabel="perplexity tax (%)",
        ylabel="margin shift (nats)",
        vlines=vlines,
    )


def readability_chart(rows: Mapping[str, Sequence[Mapping[str, float]]]) -> str:
    """Held-out probe AUROC per layer, one line per concept (rows of `readability`)."""
    return xy_chart(
        [Series(n, [(r["layer"], r["auroc"]) for r in found]) for n, found in rows.items()],
        title="Where each concept is linearly readable (held-out probe)",
        xlabel="layer",
        ylabel="AUROC on held-out pairs",
        hlines=[(0.5, "chance")],
    )


def scatter_chart(scatter: Mapping[str, Sequence[Sequence[float]]], title: str) -> str:
    """Positive against negative activations in 2-D (the output of `pca_scatter`)."""
    return xy_chart(
        [
            Series("positive", [(p[0], p[1]) for p in scatter["positive"]], lines=False),
            Series("negative", [(p[0], p[1]) for p in scatter["negative"]], lines=False),
        ],
        title=title,
        xlabel="first principal component",
        ylabel="second principal component",
    )


def cosine_heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str) -> str:
    """A symmetric cosine-similarity matrix (across layers, or between vectors)."""
    return heatmap(
        matrix,
        labels,
        labels,
        title=title,
        xlabel="",
        ylabel="",
        colorbar="cosine similarity",
        diverging=True,
    )


def slopes_chart(slopes: Sequence[float], name: str) -> str:
    """Per-example steerability, sorted: the share below 0 is anti-steerable."""
    ordered = sorted(slopes)
    return xy_chart(
        [Series("per-pair slope", list(enumerate(ordered, start=1)), lines=False)],
        title=f"{name}: steerability of each held-out pair",
        xlabel="pair (sorted by slope)",
        ylabel="margin change per unit coefficient",
        hlines=[(0.0, "0 = not steered")],
    )


def grid_heatmap(
    values: Sequence[Sequence[float | None]],
    layers: Sequence[int],
    coefficients: Sequence[float],
    *,
    title: str,
    colorbar: str,
    diverging: bool = False,
) -> str:
    """A layer x coefficient grid (rows = layers); None marks a cell not scored."""
    return heatmap(
        values,
        [str(x) for x in layers],
        [f"{c:g}" for c in coefficients],
        title=title,
        xlabel="coefficient",
        ylabel="layer",
        colorbar=colorbar,
        diverging=diverging,
    )
