"""Figures: matplotlib Figures with the expected axes, labels and series; honest about
missing values; exported as deterministic, well-formed SVG."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from acteng.errors import DataError
from acteng.evaluation import SweepResult
from acteng.evaluation.scoring import Cell
from acteng.report.export import figure_svg, save_figure, save_figures
from acteng.report.figures import (
    concept_cosines_chart,
    cosine_heatmap,
    frontier_chart,
    grid_heatmap,
    readability_chart,
    scatter_chart,
    slopes_chart,
    sweep_figures,
)

SVG = "{http://www.w3.org/2000/svg}"


def _axes(fig: Figure) -> Axes:
    assert isinstance(fig, Figure)
    return fig.axes[0]


def _legend(ax: Axes) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None
    return [t.get_text() for t in legend.get_texts()]


def _series(ax: Axes) -> dict[str, list[tuple[float, float]]]:
    """Named lines (reference lines have matplotlib's private `_child` labels)."""
    return {
        str(line.get_label()): list(zip(line.get_xdata(), line.get_ydata(), strict=True))  # type: ignore[arg-type]
        for line in ax.get_lines()
        if not str(line.get_label()).startswith("_")
    }


def _texts(ax: Axes) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _svg_texts(svg: str) -> list[str]:
    return [t.text or "" for t in ET.fromstring(svg).iter(f"{SVG}text")]


def _cells() -> list[Cell]:
    return [
        Cell("mean_diff", (8,), 2.0, effect=1.0, tax=0.01),
        Cell("mean_diff", (8,), 4.0, effect=2.0, tax=0.03),
        Cell("pca", (8,), 2.0, effect=0.5, tax=0.02),
        Cell("pca", (10,), 4.0, effect=math.nan, tax=math.nan),  # broke the model: not drawn
    ]


def test_grid_heatmap_labels_values_and_marks_missing_cells() -> None:
    fig = grid_heatmap(
        [[1.0, None], [-2.0, math.nan]],
        [8, 10],
        [2.0, 4.0],
        title="effect <sentiment>",
        colorbar="margin shift (nats)",
        diverging=True,
    )
    ax = _axes(fig)
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (
        "effect <sentiment>",
        "coefficient",
        "layer",
    )
    assert fig.axes[1].get_ylabel() == "margin shift (nats)"  # the colour bar
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["8", "10"]
    assert sorted(_texts(ax)) == ["-2.00", "1.00"]  # a value in each scored cell
    assert ax.collections[0].get_clim() == (-2.0, 2.0)  # diverging: centred on 0
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 2  # None and NaN: hatched, not coloured
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["no value"]
    svg = figure_svg(fig)
    assert "effect <sentiment>" in _svg_texts(svg)  # escaped in the file, intact when parsed
    with pytest.raises(DataError, match="2 rows x 2 columns"):
        grid_heatmap([[1.0]], [1, 2], [1.0, 2.0], title="t", colorbar="c")


def test_heatmap_without_missing_values_has_no_legend_and_a_sequential_scale() -> None:
    fig = grid_heatmap([[1.0, 3.0]], [8], [2.0, 4.0], title="tax", colorbar="perplexity change (%)")
    assert not fig.legends and not [p for p in _axes(fig).patches if p.get_hatch()]
    assert _axes(fig).collections[0].get_clim() == (1.0, 3.0)


def test_cosine_heatmap_is_square_and_diverging() -> None:
    fig = cosine_heatmap([[1.0, -0.5], [-0.5, 1.0]], ["7", "8"], "v: cosine across layers")
    ax = _axes(fig)
    assert ax.get_title() == "v: cosine across layers"
    assert fig.axes[1].get_ylabel() == "cosine similarity"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["7", "8"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["7", "8"]
    assert ax.collections[0].get_clim() == (-1.0, 1.0)


def test_frontier_chart_has_axes_legend_frontier_and_budget() -> None:
    fig = frontier_chart(_cells(), "sentiment", 0.05)
    ax = _axes(fig)
    assert ax.get_title() == "sentiment: effect against tax (each point one setting)"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("perplexity tax (%)", "margin shift (nats)")
    assert _legend(ax) == ["Pareto frontier", "mean_diff", "pca"]
    series = _series(ax)
    assert series["Pareto frontier"] == [(1.0, 1.0), (3.0, 2.0)]  # pca at 2 % is dominated
    assert series["mean_diff"] == [(1.0, 1.0), (3.0, 2.0)]
    assert series["pca"] == [(2.0, 0.5)]  # the NaN cell is left out
    assert "budget 5 %" in _texts(ax)
    assert ax.get_xlim()[1] > 5  # the x axis extends past the budget
    assert "budget" not in " ".join(_texts(_axes(frontier_chart(_cells(), "s", None))))


def test_line_charts_have_their_labels_series_and_reference_lines() -> None:
    ax = _axes(
        readability_chart({"sentiment": [{"layer": 2, "auroc": 0.6}, {"layer": 4, "auroc": 0.9}]})
    )
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("layer", "AUROC on held-out pairs")
    assert ax.get_title() == "Where each concept is linearly readable (held-out probe)"
    assert _series(ax) == {"sentiment": [(2, 0.6), (4, 0.9)]} and "chance" in _texts(ax)

    ax = _axes(scatter_chart({"positive": [[1.0, 2.0]], "negative": [[-1.0, 0.5]]}, "v (PCA)"))
    assert ax.get_title() == "v (PCA)" and _legend(ax) == ["positive", "negative"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == (
        "first principal component",
        "second principal component",
    )
    assert _series(ax) == {"positive": [(1.0, 2.0)], "negative": [(-1.0, 0.5)]}

    ax = _axes(slopes_chart([0.3, -0.1, 0.2], "sentiment"))
    assert ax.get_title() == "sentiment: steerability of each held-out pair"
    assert ax.get_ylabel() == "margin change per unit coefficient"
    assert _series(ax) == {"per-pair slope": [(1, -0.1), (2, 0.2), (3, 0.3)]}  # sorted
    assert "0 = not steered" in _texts(ax)

    cosines = {"layers": [2, 4], "pairs": {"a / b": [0.1, -0.2], "a / c": [0.3, 0.0]}}
    ax = _axes(concept_cosines_chart(cosines))
    assert ax.get_title() == "Cosine between concepts' mean-difference directions"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("layer", "cosine similarity")
    assert _series(ax) == {"a / b": [(2, 0.1), (4, -0.2)], "a / c": [(2, 0.3), (4, 0.0)]}
    assert "orthogonal" in _texts(ax)


def test_charts_without_series_are_drawn_empty_without_a_legend() -> None:
    # the demo with one concept has no pair of concepts to compare; warnings are errors here
    lonely = concept_cosines_chart({"layers": [2, 4], "pairs": {}})
    assert "one concept: no pair to compare" in _texts(_axes(lonely))
    for fig in (lonely, readability_chart({})):
        assert _axes(fig).get_legend() is None
        ET.fromstring(figure_svg(fig))
    broken = [Cell("pca", (8,), 4.0, effect=math.nan, tax=math.nan)]
    fig = frontier_chart(broken, "s", 0.05)
    assert _legend(_axes(fig)) == ["Pareto frontier"]  # its empty line, as before
    ET.fromstring(figure_svg(fig))


def test_sweep_figures_draw_each_method_and_the_frontier(tmp_path: Path) -> None:
    result = SweepResult(
        {"name": "sentiment"}, ("mean_diff", "pca"), (8, 10), (2.0, 4.0), 0.0, 10.0, None
    )
    result.cells.extend(_cells())
    figures = sweep_figures(result, max_tax=0.05)
    assert list(figures) == [
        "effect_mean_diff",
        "tax_mean_diff",
        "effect_pca",
        "tax_pca",
        "frontier",
    ]
    effect = _axes(figures["effect_mean_diff"])
    assert effect.get_title() == "sentiment: behaviour effect of mean_diff"
    assert figures["effect_mean_diff"].axes[1].get_ylabel() == "margin shift (nats)"
    assert sorted(_texts(effect)) == ["1.00", "2.00"]  # layer 10 was not scored: hatched
    assert len([p for p in effect.patches if p.get_hatch()]) == 2
    tax = _axes(figures["tax_pca"])
    assert tax.get_title() == "sentiment: perplexity tax of pca"
    assert figures["tax_pca"].axes[1].get_ylabel() == "perplexity change (%)"
    assert _texts(tax) == ["2.00"]  # tax in %; the NaN cell is hatched, not a value
    assert "budget 5 %" in _texts(_axes(figures["frontier"]))
    paths = save_figures(figures, tmp_path / "plots")
    assert [p.name for p in paths] == [f"{stem}.svg" for stem in figures]
    for path in paths:
        assert ET.parse(path).getroot().tag == f"{SVG}svg"


def test_svg_is_deterministic_self_contained_and_keeps_text(tmp_path: Path) -> None:
    svg = figure_svg(frontier_chart(_cells(), "sentiment", 0.05))
    assert svg == figure_svg(frontier_chart(_cells(), "sentiment", 0.05))  # a new figure
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg" and svg.startswith("<svg")  # no prolog: pastes into HTML
    title = root.find(f"{SVG}title")
    assert (
        title is not None and title.text == "sentiment: effect against tax (each point one setting)"
    )
    assert {"perplexity tax (%)", "margin shift (nats)", "mean_diff", "budget 5 %"} <= set(
        _svg_texts(svg)
    )
    assert "http" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert not re.search(r"<dc:date|<metadata|xlink|<image", svg)
    path = save_figure(frontier_chart(_cells(), "sentiment", 0.05), tmp_path / "f.svg")
    assert path.read_text() == svg
    # the same bytes in another process (another hash seed, fresh ids)
    code = (
        "import sys; from tests.report.test_figures import _cells;"
        "from acteng.report.export import figure_svg;"
        "from acteng.report.figures import frontier_chart;"
        "sys.stdout.write(figure_svg(frontier_chart(_cells(), 'sentiment', 0.05)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == svg


def test_importing_the_figures_does_not_import_matplotlib() -> None:
    code = (
        "import sys, acteng.report.figures, acteng.report.export;print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
