"""`acteng demo` on the real model (one concept, a small grid, to keep the test quick; the
full demo runs in CI through the README's main command)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import acteng
from acteng.report.demo import DEMO_CONCEPTS, run_demo


@pytest.mark.real
def test_demo_writes_a_self_contained_report(
    smollm2: acteng.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("acteng.report.demo.TUNE_LAYERS", (8,))
    monkeypatch.setattr("acteng.report.demo.TUNE_COEFFICIENTS", (2.0,))
    monkeypatch.setattr("acteng.report.demo.EVAL_PAIRS", 4)
    report = run_demo(smollm2, tmp_path, concepts=DEMO_CONCEPTS[:1], max_new_tokens=8, quiet=True)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["concepts"].keys() == {"sentiment"} == report["concepts"].keys()
    concept = saved["concepts"]["sentiment"]
    tuned = concept["tuned"]
    assert tuned["tax"] <= 0.05 and tuned["effect"] >= tuned["grid_best"]["effect"]
    assert (tmp_path / tuned["vector"]).is_file()
    assert len(concept["generations"]) == 3
    assert any(g["steered"] != g["unsteered"] for g in concept["generations"])
    assert {"tax", "reliability", "baseline"} <= concept["evaluation"].keys()
    assert 0.5 < saved["detection"]["auroc"] <= 1
    html = (tmp_path / "report.html").read_text()
    # one file: no scripts, style sheets, images or links to fetch
    assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|url\((?!#)", html)
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(svgs) >= 6
    for svg in svgs:
        ET.fromstring(svg)  # well-formed
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
        [
            "cosines.svg",
            "frontier_sentiment.svg",
            "readability.svg",
            "scatter.svg",
            "slopes_sentiment.svg",
            "tax_sentiment.svg",
        ]
    )
