"""The project's figures as matplotlib `Figure` objects, shared by the CLI (`sweep`, `tune`,
`analyze`) and the demo report, so one question is always drawn one way.

Each function returns a new `matplotlib.figure.Figure` made without pyplot: no global
figure list, no GUI backend, nothing to close. A notebook shows it, ``fig.savefig`` writes
any format, and `acteng.report.export` turns it into SVG text for files and the report.
Every chart has a title and labelled axes; heatmaps carry a colour bar and, when the grid
is small enough to read, the value in each cell. Missing values (None or NaN) are drawn as
hatched grey cells, never as a colour that means a value. matplotlib is imported on first
use, so importing this module stays cheap.

    fig = frontier_chart(result.cells, "sentiment", max_tax=0.05)
    fig.savefig("frontier.png")
    figures = sweep_figures(result)  # {"effect_mean_diff": Figure, ..., "frontier": Figure}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from acteng.errors import DataError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from acteng.evaluation import SweepResult

__all__ = [
    "PALETTE",
    "concept_cosines_chart",
    "cosine_heatmap",
    "frontier_chart",
    "grid_heatmap",
    "readability_chart",
    "scatter_chart",
    "slopes_chart",
    "sweep_figures",
]

# Colour-blind-safe categorical palette (Okabe-Ito).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_REFERENCE_COLOUR = "#888888"
_REFERENCE_DASHES = (0, (5, 4))
# behind a reference line's label, so a point or line under it does not blur the text
_LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.0}


def _is_missing(value: float | None) -> bool:
    return value is None or not math.isfinite(value)


def _fmt(value: float) -> str:
    """A cell's value in at most four characters' worth of precision."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000 or magnitude < 0.01:
        return f"{value:.2g}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _missing_cell(x: float, y: float) -> Rectangle:
    """A hatched grey unit square: the mark for a cell without a value."""
    from matplotlib.patches import Rectangle

    return Rectangle(
        (x, y), 1, 1, facecolor="#dddddd", edgecolor="#aaaaaa", hatch="///", linewidth=0.0
    )


def _figure(width: float, height: float, title: str) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    fig.set_label(title)  # becomes the SVG <title>
    ax = fig.add_subplot()
    ax.set_title(title, fontweight="bold", wrap=True)
    return fig, ax


def _chart(
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: Sequence[tuple[float, str]] = (),
    vlines: Sequence[tuple[float, str]] = (),
    *,
    whole_x: bool = False,
) -> tuple[Figure, Axes]:
    """An empty x-y chart: labelled axes, a light grid, dashed reference lines (a budget,
    chance level) labelled where they sit; `whole_x` for counts (layers, pairs), which
    have no ticks between whole numbers."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(7.2, 4.0, title)
    if whole_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#eeeeee", linewidth=0.8)
    ax.set_axisbelow(True)
    for value, label in hlines:
        ax.axhline(value, color=_REFERENCE_COLOUR, linestyle=_REFERENCE_DASHES, linewidth=1.0)
        ax.annotate(
            label,
            (1, value),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 3),
            textcoords="offset points",
            ha="right",
            fontsize=8,
            color="#555555",
            bbox=_LABEL_BOX,
        )
    for value, label in vlines:
        ax.axvline(value, color=_REFERENCE_COLOUR, linestyle=_REFERENCE_DASHES, linewidth=1.0)
        ax.annotate(
            label,
            (value, 1),
            xycoords=("data", "axes fraction"),
            # left of the line: a budget often sits at the right edge, next to the legend
            xytext=(-4, -12),
            textcoords="offset points",
            ha="right",
            fontsize=8,
            color="#555555",
            bbox=_LABEL_BOX,
        )
    return fig, ax


def _legend(ax: Axes) -> None:
    """The legend outside the plot, on the right, so it never hides a point; none for a
    chart with no series (the demo's concept cosines with one concept), where matplotlib
    would warn that it has nothing to show."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)


def _finite(points: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    kept = [(float(p[0]), float(p[1])) for p in points if not any(map(_is_missing, p[:2]))]
    return [x for x, _ in kept], [y for _, y in kept]


def _heatmap(
    values: Sequence[Sequence[float | None]],
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar: str,
    diverging: bool = False,
    annotate: bool | None = None,
) -> Figure:
    """A grid of coloured cells, rows top to bottom; `diverging` centres the scale on 0."""
    import numpy as np

    if len(values) != len(rows) or any(len(r) != len(cols) for r in values):
        shape = f"{len(values)} rows x {sorted({len(r) for r in values})} columns"
        raise DataError(
            f"heatmap values must be {len(rows)} rows x {len(cols)} columns (one per label), "
            f"got {shape}; pass one value (or None) per row and column label"
        )
    grid = np.array(
        [[math.nan if v is None or not math.isfinite(v) else float(v) for v in r] for r in values],
        dtype=np.float64,
    ).reshape(len(rows), len(cols))
    present = grid[np.isfinite(grid)]
    low, high = (float(present.min()), float(present.max())) if present.size else (0.0, 1.0)
    if diverging:
        reach = max(abs(low), abs(high)) or 1.0
        low, high = -reach, reach
    elif high == low:
        high = low + 1.0
    cell_w = min(max(6.0 / max(len(cols), 1), 0.3), 0.7)
    cell_h = min(max(5.0 / max(len(rows), 1), 0.22), 0.45)
    fig, ax = _figure(max(cell_w * len(cols) + 2.6, 5.0), cell_h * len(rows) + 1.6, title)
    mesh = ax.pcolormesh(
        np.ma.masked_invalid(grid),
        cmap="RdBu_r" if diverging else "viridis",
        vmin=low,
        vmax=high,
    )
    missing = [(i, j) for i in range(len(rows)) for j in range(len(cols)) if np.isnan(grid[i, j])]
    for i, j in missing:
        ax.add_patch(_missing_cell(j, i))
    if missing:
        handle = _missing_cell(0, 0)
        handle.set_label("no value")
        fig.legend(
            handles=[handle],
            loc="outside lower right",
            frameon=False,
            fontsize=8,
        )
    show = annotate if annotate is not None else len(cols) <= 14 and cell_h >= 0.22
    if show:
        for i in range(len(rows)):
            for j in range(len(cols)):
                if np.isnan(grid[i, j]):
                    continue
                r, g, b, _ = mesh.cmap(mesh.norm(grid[i, j]))
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"
                text = _fmt(float(grid[i, j]))
                ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=7, color=ink)
    ax.set_xticks([j + 0.5 for j in range(len(cols))], list(cols), fontsize=8)
    ax.set_yticks([i + 0.5 for i in range(len(rows))], list(rows), fontsize=8)
    ax.tick_params(length=0)
    ax.set_xlim(0, len(cols))
    ax.set_ylim(len(rows), 0)  # first row at the top, as it reads in a table
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(mesh, ax=ax, label=colorbar, shrink=min(1.0, max(0.5, 3.0 / len(rows))))
    return fig


def frontier_chart(cells: Sequence[Any], name: str, max_tax: float | None) -> Figure:
    """Effect against tax for every scored `acteng.evaluation.scoring.Cell`, per method, with the
    Pareto frontier and the budget."""
    scored = [c for c in cells if math.isfinite(c.effect) and math.isfinite(c.tax)]
    frontier, best = [], -math.inf
    for c in sorted(scored, key=lambda c: (c.tax, -c.effect)):
        if c.effect > best:
            frontier.append((100 * c.tax, c.effect))
            best = c.effect
    vlines = [(100 * max_tax, f"budget {100 * max_tax:g} %")] if max_tax is not None else []
    fig, ax = _chart(
        f"{name}: effect against tax (each point one setting)",
        "perplexity tax (%)",
        "margin shift (nats)",
        vlines=vlines,
    )
    # the frontier line first, so every method's markers stay visible on top of it
    xs, ys = _finite(frontier)
    ax.plot(xs, ys, color="#999999", linewidth=2, label="Pareto frontier")
    for k, method in enumerate(dict.fromkeys(c.method for c in scored)):
        xs, ys = _finite([(100 * c.tax, c.effect) for c in scored if c.method == method])
        ax.plot(xs, ys, "o", color=PALETTE[k % len(PALETTE)], markersize=5, label=method)
    _legend(ax)
    return fig


def readability_chart(rows: Mapping[str, Sequence[Mapping[str, float]]]) -> Figure:
    """Held-out probe AUROC per layer, one line per concept (rows of `readability`)."""
    fig, ax = _chart(
        "Where each concept is linearly readable (held-out probe)",
        "layer",
        "AUROC on held-out pairs",
        hlines=[(0.5, "chance")],
        whole_x=True,
    )
    for k, (name, found) in enumerate(rows.items()):
        xs, ys = _finite([(r["layer"], r["auroc"]) for r in found])
        ax.plot(xs, ys, "-o", color=PALETTE[k % len(PALETTE)], markersize=4, label=name)
    _legend(ax)
    return fig


def scatter_chart(scatter: Mapping[str, Sequence[Sequence[float]]], title: str) -> Figure:
    """Positive against negative activations in 2-D (the output of `pca_scatter`)."""
    fig, ax = _chart(title, "first principal component", "second principal component")
    for k, side in enumerate(("positive", "negative")):
        xs, ys = _finite(scatter[side])
        ax.plot(xs, ys, "o", color=PALETTE[k], markersize=4, alpha=0.8, label=side)
    _legend(ax)
    return fig


def concept_cosines_chart(cosines: Mapping[str, Any]) -> Figure:
    """Cosine between every two concepts' directions per layer: ``{"layers": [...],
    "pairs": {"a / b": [cosine per layer], ...}}`` (the demo's ``report["cosines"]``)."""
    fig, ax = _chart(
        "Cosine between concepts' mean-difference directions",
        "layer",
        "cosine similarity",
        hlines=[(0.0, "orthogonal")],
        whole_x=True,
    )
    for k, (pair, values) in enumerate(cosines["pairs"].items()):
        xs, ys = _finite(list(zip(cosines["layers"], values, strict=True)))
        ax.plot(xs, ys, "-o", color=PALETTE[k % len(PALETTE)], markersize=4, label=pair)
    if not cosines["pairs"]:
        ax.text(0.5, 0.5, "one concept: no pair to compare", ha="center", transform=ax.transAxes)
    _legend(ax)
    return fig


def cosine_heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str) -> Figure:
    """A symmetric cosine-similarity matrix (across layers, or between vectors)."""
    return _heatmap(
        matrix,
        labels,
        labels,
        title=title,
        xlabel="",
        ylabel="",
        colorbar="cosine similarity",
        diverging=True,
    )


def slopes_chart(slopes: Sequence[float], name: str) -> Figure:
    """Per-example steerability, sorted: the share below 0 is anti-steerable."""
    fig, ax = _chart(
        f"{name}: steerability of each held-out pair",
        "pair (sorted by slope)",
        "margin change per unit coefficient",
        hlines=[(0.0, "0 = not steered")],
        whole_x=True,
    )
    xs, ys = _finite(list(enumerate(sorted(slopes), start=1)))
    ax.plot(xs, ys, "o", color=PALETTE[0], markersize=4, label="per-pair slope")
    _legend(ax)
    return fig


def grid_heatmap(
    values: Sequence[Sequence[float | None]],
    layers: Sequence[int],
    coefficients: Sequence[float],
    *,
    title: str,
    colorbar: str,
    diverging: bool = False,
) -> Figure:
    """A layer x coefficient grid (rows = layers); None marks a cell not scored."""
    return _heatmap(
        values,
        [str(x) for x in layers],
        [f"{c:g}" for c in coefficients],
        title=title,
        xlabel="coefficient",
        ylabel="layer",
        colorbar=colorbar,
        diverging=diverging,
    )


def sweep_figures(result: SweepResult, *, max_tax: float | None = None) -> dict[str, Figure]:
    """A sweep's figures keyed by file stem: effect and tax heatmaps per method
    (``effect_<method>``, ``tax_<method>``) and the effect-vs-tax ``frontier`` with the
    budget `max_tax` marked. `acteng.report.export.save_figures` writes them as SVG."""
    name = result.dataset.get("name", "dataset")
    figures: dict[str, Figure] = {}
    for method in result.methods:
        for what, label, colorbar in (
            ("effect", "behaviour effect", "margin shift (nats)"),
            ("tax", "perplexity tax", "perplexity change (%)"),
        ):
            figures[f"{what}_{method}"] = grid_heatmap(
                result.grid(method, what),
                result.layers,
                result.coefficients,
                title=f"{name}: {label} of {method}",
                colorbar=colorbar,
                diverging=what == "effect",
            )
    figures["frontier"] = frontier_chart(result.cells, name, max_tax)
    return figures
