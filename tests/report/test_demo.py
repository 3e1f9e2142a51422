"""`acteng demo` on the real model.

The full demo is the README's main command, so CI has just run it on this tree when the
tests start: `scripts/check` then points ``ACTENG_DEMO_OUTPUT`` at that fresh ``demo/``
folder (only when ``demo/report.json`` is newer than every file under ``src/``) and this
test checks the whole report, every concept. Without it (a developer's run), the test runs
the demo itself on one concept and a small grid, to stay quick.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import acteng
from acteng.report.demo import DEMO_CONCEPTS, run_demo


@pytest.fixture
def demo_output(smollm2: acteng.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    given = os.environ.get("ACTENG_DEMO_OUTPUT")
    if given:
        return Path(given)
    monkeypatch.setattr("acteng.report.demo.TUNE_LAYERS", (8,))
    monkeypatch.setattr("acteng.report.demo.TUNE_COEFFICIENTS", (2.0,))
    monkeypatch.setattr("acteng.report.demo.EVAL_PAIRS", 4)
    report = run_demo(smollm2, tmp_path, concepts=DEMO_CONCEPTS[:1], max_new_tokens=8, quiet=True)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(
        json.dumps(report, allow_nan=False)
    )
    return tmp_path


@pytest.mark.real
def test_demo_writes_a_self_contained_report(demo_output: Path) -> None:
    saved = json.loads((demo_output / "report.json").read_text())
    names = list(saved["concepts"])
    assert names and set(names) <= {c.name for c in DEMO_CONCEPTS}
    for name in names:
        concept = saved["concepts"][name]
        tuned = concept["tuned"]
        assert tuned["tax"] <= saved["settings"]["max_tax"]
        # the grid may have nothing within the budget (then only the search found a setting)
        if tuned["grid_best"] is not None:
            assert tuned["effect"] >= tuned["grid_best"]["effect"]
        assert (demo_output / tuned["vector"]).is_file()
        assert len(concept["generations"]) == 3
        assert any(g["steered"] != g["unsteered"] for g in concept["generations"])
        assert {"tax", "reliability", "baseline"} <= concept["evaluation"].keys()
    assert 0.5 < saved["detection"]["auroc"] <= 1
    html = (demo_output / "report.html").read_text()
    # one file: no scripts, style sheets, images or links to fetch
    assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|url\((?!#)", html)
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(svgs) >= 3 + 3 * len(names)
    for svg in svgs:
        ET.fromstring(svg)  # well-formed
    per_concept = [f"{kind}_{name}.svg" for name in names for kind in ("frontier", "slopes", "tax")]
    assert sorted(p.name for p in (demo_output / "plots").iterdir()) == sorted(
        ["cosines.svg", "readability.svg", "scatter.svg", *per_concept]
    )


def test_demo_concepts_are_chosen_by_name() -> None:
    from acteng.cli import demo_cmd
    from acteng.errors import ConfigError
    from acteng.report.demo import DEFAULT_CONCEPTS, demo_concepts

    assert ",".join(DEFAULT_CONCEPTS) == demo_cmd.DEFAULT_CONCEPTS
    assert ",".join(c.name for c in DEMO_CONCEPTS) == demo_cmd.ALL_CONCEPTS
    assert [c.name for c in demo_concepts(["refusal", "sentiment"])] == ["refusal", "sentiment"]
    for bad in (["joy"], [], ["sentiment", "sentiment"]):
        with pytest.raises(ConfigError, match="demo concepts must be distinct names among"):
            demo_concepts(bad)
