"""Sweeps and tuning on the real default model: held-out effect, tax budget, plots,
reproducibility of the tuned vector, bad input, Ctrl-C."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

import acteng
from acteng.cli import main
from acteng.errors import ConfigError, DataError
from acteng.evaluation.metrics import logprob_margin
from acteng.evaluation.tax import load_eval
from acteng.evaluation.tuning import Scorer, check_budget, held_out, sweep, tune
from acteng.pairs import Pairs
from acteng.report.export import save_figures
from acteng.report.figures import sweep_figures


def _small(name: str = "sentiment", train: int = 16, test: int = 6) -> Pairs:
    data = acteng.load_pairs(name)
    return Pairs(tuple(data.split("train")[:train]) + tuple(data.split("test")[:test]), name=name)


NEUTRAL = load_eval("neutral_text", split="test")[:3]


def _write(path: Path, pairs: Pairs) -> Path:
    rows = (
        {"prompt": p.prompt, "positive": p.positive, "negative": p.negative, "split": p.split}
        for p in pairs
    )
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_held_out_split_and_bad_data() -> None:
    rows = [{"prompt": f"q{i}", "positive": f"yes {i}", "negative": f"no {i}"} for i in range(10)]
    fit, test = held_out(acteng.load_pairs(rows))
    assert (len(fit), len(test)) == (8, 2)  # every fifth pair held out when there is no split
    with pytest.raises(DataError, match="without a 'prompt'"):
        held_out(acteng.load_pairs([("good", "bad")] * 5))
    with pytest.raises(DataError, match="no contrast"):
        held_out(acteng.load_pairs([{"prompt": "q", "positive": "a", "negative": "a"}] * 5))
    with pytest.raises(DataError, match="at least 2 and 1"):
        held_out(acteng.load_pairs(rows[:2]))


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_budget_outside_unit_interval_is_refused(budget: float) -> None:
    with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
        check_budget(budget)


@pytest.mark.real
def test_sweep_scores_every_cell_and_plots(smollm2: acteng.Model, tmp_path: Path) -> None:
    result = sweep(
        smollm2,
        _small(),
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
    names = sorted(p.name for p in save_figures(sweep_figures(result, max_tax=0.05), tmp_path))
    assert names == [
        "effect_mean_diff.svg",
        "effect_pca.svg",
        "frontier.svg",
        "tax_mean_diff.svg",
        "tax_pca.svg",
    ]
    with pytest.raises(ConfigError, match="finite"):
        sweep(smollm2, _small(), layers=[8], coefficients=[math.nan])


@pytest.mark.real
def test_tune_beats_its_grid_within_budget_and_the_vector_reproduces_the_effect(
    smollm2: acteng.Model,
) -> None:
    data = _small()
    result = tune(
        smollm2,
        data,
        max_tax=0.2,
        methods=("mean_diff",),
        layers=[8, 10],
        coefficients=(1.0, 2.0),
        neutral=NEUTRAL,
    )
    assert result.grid_best is not None
    assert result.effect >= result.grid_best.effect > 0
    assert result.tax <= 0.2 and result.vector.layers == result.layers
    # adding coefficient * vector at its layers gives back the reported effect
    test = data.split("test")
    spec = acteng.SteeringSpec(result.vector, result.coefficient)
    shift = statistics.fmean(logprob_margin(smollm2, test, spec)) - statistics.fmean(
        logprob_margin(smollm2, test)
    )
    assert shift == pytest.approx(result.effect, abs=1e-9)
    tuning = result.vector.metadata["tuning"]
    assert tuning["coefficient"] == result.coefficient and tuning["max_tax"] == 0.2
    with pytest.raises(ConfigError, match="no setting stayed within"):
        tune(
            smollm2,
            data,
            max_tax=1e-9,
            methods=("mean_diff",),
            layers=[14],
            coefficients=(8.0,),
            neutral=NEUTRAL,
        )


@pytest.mark.real
def test_scorer_reports_p_match_for_ab_items(smollm2: acteng.Model) -> None:
    test = acteng.load_pairs("power_seeking", split="test")[:4]
    scorer = Scorer(smollm2, test, NEUTRAL)
    assert scorer.base_p_match is not None and 0 < scorer.base_p_match < 1
    vector = acteng.extract(smollm2, _small("power_seeking"), layers=[10], position="answer")
    cell = scorer.score("mean_diff", vector, [10], 4.0)
    assert cell.p_match is not None and cell.to_json()["p_match"] == cell.p_match


@pytest.mark.real
def test_cli_sweep_keeps_results_on_ctrl_c(
    smollm2: acteng.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = _write(tmp_path / "pairs.jsonl", _small())
    monkeypatch.setattr("acteng.cli.sweep_cmd.load_model_from_args", lambda args: smollm2)
    real = Scorer.score
    calls = [0]

    def interrupted(self: Scorer, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "score", interrupted)
    monkeypatch.setattr("acteng.evaluation.tuning.load_eval", lambda *a, **k: NEUTRAL)
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


def test_cli_refuses_bad_budget_and_coefficients(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--pairs", "sentiment", "--max-tax", "0", "--out", "v.safetensors"]) == 2
    assert "in (0, 1]" in capsys.readouterr().err
    assert (
        main(["tune", "--pairs", "sentiment", "--coefficients", "1,nan", "--out", "v.safetensors"])
        == 2
    )
    assert "finite" in capsys.readouterr().err


@pytest.mark.real
def test_settings_that_break_the_model_are_recorded_not_chosen(smollm2: acteng.Model) -> None:
    data = _small(test=2)
    with pytest.raises(ConfigError, match=r"\|c\| <= 10000"):
        sweep(smollm2, data, layers=[8], coefficients=(1e30,), neutral=NEUTRAL)
    scorer = Scorer(smollm2, data.split("test"), NEUTRAL)
    vector = acteng.extract(smollm2, data.split("train"), layers=[8]) * 1e35
    cell = scorer.score("mean_diff", vector, [8], 1e4)  # overflows float32: NaN outputs
    assert not math.isfinite(cell.tax) and not math.isfinite(cell.effect)
    assert not cell.within(1.0) and cell.to_json()["tax"] is None  # JSON null, not NaN


@pytest.mark.real
def test_cli_sweep_and_tune_write_their_results(
    smollm2: acteng.Model,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pairs = _write(tmp_path / "pairs.jsonl", _small(train=12, test=4))
    monkeypatch.setattr("acteng.cli.sweep_cmd.load_model_from_args", lambda args: smollm2)
    monkeypatch.setattr("acteng.evaluation.tuning.load_eval", lambda *a, **k: NEUTRAL)
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                "--pairs",
                str(pairs),
                "--layers",
                "8",
                "--coefficients",
                "2",
                "--out",
                str(out),
                "--max-tax",
                "0.1",
            ]
        )
        == 0
    )
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["complete"] is True and len(saved["cells"]) == 1
    assert {p.name for p in out.glob("*.svg")} == {
        "effect_mean_diff.svg",
        "tax_mean_diff.svg",
        "frontier.svg",
    }
    capsys.readouterr()
    vector = tmp_path / "tuned.safetensors"
    assert (
        main(
            [
                "tune",
                "--pairs",
                str(pairs),
                "--layers",
                "8",
                "--coefficients",
                "1",
                "--methods",
                "mean_diff",
                "--max-tax",
                "0.5",
                "--out",
                str(vector),
                "--plots",
                str(tmp_path / "tune_plots"),
                "--json",
            ]
        )
        == 0
    )
    assert [p.name for p in (tmp_path / "tune_plots").iterdir()] == ["frontier.svg"]
    report = json.loads(capsys.readouterr().out)
    assert {"vector", "coefficient", "layers", "effect", "tax"} <= report.keys()
    assert report["vector"] == str(vector) and report["tax"] <= 0.5
    loaded = acteng.SteeringVector.load(vector, model=smollm2)
    assert list(loaded.layers) == report["layers"]
