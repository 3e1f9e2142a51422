"""Sweeps: every cell scored on held-out data, plots, a DataFrame, Ctrl-C keeps results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import acteng
from acteng.cli import main
from acteng.errors import ConfigError
from acteng.evaluation import SweepResult, sweep
from acteng.evaluation.scoring import Cell, Scorer
from acteng.report.export import save_figures
from acteng.report.figures import sweep_figures
from tests.evaluation.grid_data import NEUTRAL, bare_pairs, small_pairs, write_pairs


def test_to_pandas_has_one_row_per_cell() -> None:
    result = SweepResult({"name": "toy"}, ("mean_diff",), (3, 5), (1.0, 2.0), 0.5, 10.0, None)
    assert list(result.to_pandas().columns) == [
        "method",
        "layer",
        "coefficient",
        "effect",
        "tax",
        "p_match",
    ]
    assert len(result.to_pandas()) == 0  # nothing scored yet: the columns all the same
    result.cells += [
        Cell("mean_diff", (3,), 1.0, 0.25, 0.01, 0.6),
        Cell("mean_diff", (5,), 2.0, math.nan, math.nan),
    ]
    frame = result.to_pandas()
    assert frame["layer"].tolist() == [3, 5] and frame["coefficient"].tolist() == [1.0, 2.0]
    assert frame["effect"].iloc[0] == 0.25 and math.isnan(frame["effect"].iloc[1])
    assert frame["p_match"].iloc[0] == 0.6 and math.isnan(frame["p_match"].iloc[1])
    grid = frame.pivot(index="layer", columns="coefficient", values="tax")
    assert grid.loc[3, 1.0] == 0.01


@pytest.mark.real
def test_sweep_scores_every_cell_and_plots(smollm2: acteng.Model, tmp_path: Path) -> None:
    result = sweep(
        smollm2,
        small_pairs(),
        methods=("mean_diff", "pca"),
        layers=[8],
        coefficients=(-2.0, 2.0),
        neutral=NEUTRAL,
    )
    assert result.complete and len(result.cells) == 4
    by = {(c.method, c.coefficient): c for c in result.cells}
    assert by["mean_diff", 2.0].effect > 0 > by["mean_diff", -2.0].effect
    assert all(math.isfinite(c.tax) for c in result.cells)
    payload = json.loads(json.dumps(result.to_json()))
    assert payload["unsteered"]["perplexity"] > 1 and len(payload["cells"]) == 4
    frame = result.to_pandas()
    assert frame.drop(columns="p_match").to_dict("records") == [
        {
            "method": c.method,
            "layer": 8,
            "coefficient": c.coefficient,
            "effect": c.effect,
            "tax": c.tax,
        }
        for c in result.cells
    ]
    assert frame["p_match"].isna().all()  # sentiment pairs are not A/B items
    names = sorted(p.name for p in save_figures(sweep_figures(result, max_tax=0.05), tmp_path))
    assert names == [
        "effect_mean_diff.svg",
        "effect_pca.svg",
        "frontier.svg",
        "tax_mean_diff.svg",
        "tax_pca.svg",
    ]
    with pytest.raises(ConfigError, match="finite"):
        sweep(smollm2, small_pairs(), layers=[8], coefficients=[math.nan])


@pytest.mark.real
def test_cli_sweep_keeps_results_on_ctrl_c(
    smollm2: acteng.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", small_pairs())
    monkeypatch.setattr("acteng.cli.sweep_cmd.load_model_from_args", lambda args: smollm2)
    real = Scorer.score
    calls = [0]

    def interrupted(self: Scorer, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "score", interrupted)
    monkeypatch.setattr("acteng.evaluation.scoring.load_eval", lambda *a, **k: NEUTRAL)
    out = tmp_path / "sweep"
    status = main(
        [
            "sweep",
            "--pairs",
            str(pairs),
            "--layers",
            "8",
            "--coefficients",
            "1,2,4",
            "--out",
            str(out),
        ]
    )
    assert status == 130
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["complete"] is False and len(saved["cells"]) == 1
    assert (out / "frontier.svg").is_file()


def test_sweep_measures_on_a_separate_test_set(tiny_llama: acteng.Model) -> None:
    bare = bare_pairs(small_pairs(train=6, test=0))
    prompted = small_pairs(train=0, test=3)
    result = sweep(
        tiny_llama, bare, layers=[1], coefficients=(1.0,), neutral=NEUTRAL, test=prompted
    )
    assert result.complete and len(result.cells) == 1
    assert result.dataset == bare.provenance()  # fit on every bare pair
    measured = prompted.split("test")
    assert result.to_json()["measured_on"] == {
        **measured.provenance(),
        "effect_measure": "mean log-prob margin shift (nats) on the test pairs",
    }
    held = sweep(
        tiny_llama,
        bare_pairs(small_pairs(train=6, test=2)),
        layers=[1],
        coefficients=(1.0,),
        neutral=NEUTRAL,
    )
    assert "user turn 'Say something.'" in held.measured_on["effect_measure"]
    assert math.isfinite(held.cells[0].effect)


def test_cli_sweep_checks_the_test_file_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", "--pairs", "sentiment", "--out", str(out), "--test"]
    assert main([*args, str(tmp_path / "missing.jsonl")]) == 2
    assert "no dataset at" in capsys.readouterr().err and not out.exists()
