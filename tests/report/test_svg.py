"""SVG plots: well-formed, labelled, honest about missing values."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from acteng.report.svg import Series, heatmap, save_svg, xy_chart

SVG = "{http://www.w3.org/2000/svg}"


def _texts(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def test_heatmap_labels_values_and_marks_missing_cells() -> None:
    svg = heatmap(
        [[1.0, None], [-2.0, math.nan]],
        ["8", "10"],
        ["2", "4"],
        title="effect <sentiment>",
        xlabel="coefficient",
        ylabel="layer",
        colorbar="margin shift (nats)",
        diverging=True,
    )
    texts = _texts(svg)
    assert "effect <sentiment>" in texts  # escaped in the file, intact when parsed
    assert {"coefficient", "layer", "margin shift (nats)", "8", "10", "1.00", "-2.00"} <= set(texts)
    assert svg.count('fill="url(#missing)"') == 2  # None and NaN: hatched, not coloured
    with pytest.raises(ValueError, match="2 rows x 2 columns"):
        heatmap([[1.0]], ["a", "b"], ["x", "y"], title="t", xlabel="x", ylabel="y", colorbar="c")


def test_xy_chart_has_axes_legend_and_reference_lines(tmp_path: Path) -> None:
    svg = xy_chart(
        [Series("mean_diff", [(0.5, 1.0), (2.0, 3.0)]), Series("pca", [(1.0, math.nan)])],
        title="frontier",
        xlabel="perplexity tax (%)",
        ylabel="margin shift (nats)",
        vlines=[(5.0, "budget 5 %")],
    )
    texts = _texts(svg)
    assert {"frontier", "perplexity tax (%)", "margin shift (nats)", "mean_diff", "pca"} <= set(
        texts
    )
    assert "budget 5 %" in texts and "6" in texts  # the x axis extends past the budget
    path = save_svg(svg, tmp_path / "f.svg")
    assert ET.parse(path).getroot().tag == f"{SVG}svg"
