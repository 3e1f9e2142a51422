"""Tuning on the real default model: within the budget, never worse than its grid, the
tuned vector reproduces the effect; bad input; the CLI's sweep and tune outputs."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

import acteng
from acteng.cli import main
from acteng.errors import ConfigError
from acteng.evaluation import TuneResult, tune
from acteng.evaluation.metrics import logprob_margin
from acteng.evaluation.scoring import Cell
from tests.evaluation.grid_data import NEUTRAL, bare_pairs, small_pairs, write_pairs


def test_to_pandas_has_one_row_per_searched_setting() -> None:
    vector = acteng.SteeringVector({x: torch.ones(3) for x in (3, 4, 5)})
    candidates = [
        Cell("mean_diff", (4,), 1.0, 0.2, 0.01),
        Cell("mean_diff", (4,), 2.0, math.nan, 0.09),  # over the budget: effect not measured
        Cell("pca", (3, 4, 5), 1.5, 0.3, 0.04, 0.7),
    ]
    result = TuneResult(
        vector=vector,
        method="pca",
        layers=(3, 4, 5),
        coefficient=1.5,
        effect=0.3,
        tax=0.04,
        p_match=0.7,
        max_tax=0.05,
        grid_best=candidates[0],
        base_margin=0.1,
        base_perplexity=9.0,
        base_p_match=None,
        candidates=candidates,
    )
    frame = result.to_pandas()
    assert list(frame.columns) == [
        "method",
        "layers",
        "coefficient",
        "effect",
        "tax",
        "p_match",
        "within_budget",
        "chosen",
    ]
    assert frame["layers"].tolist() == [(4,), (4,), (3, 4, 5)]
    assert frame["within_budget"].tolist() == [True, False, True]
    assert frame["chosen"].tolist() == [False, False, True]
    assert math.isnan(frame["effect"].iloc[1]) and math.isnan(frame["p_match"].iloc[0])
    assert frame["p_match"].iloc[2] == 0.7


@pytest.mark.real
def test_tune_beats_its_grid_within_budget_and_the_vector_reproduces_the_effect(
    smollm2: acteng.Model,
) -> None:
    data = small_pairs()
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
    # the refinement's bands of three stay within the layers asked for
    assert all(set(c.layers) <= {8, 10} for c in result.candidates)
    # adding coefficient * vector at its layers gives back the reported effect
    test = data.split("test")
    spec = acteng.SteeringSpec(result.vector, result.coefficient)
    shift = statistics.fmean(logprob_margin(smollm2, test, spec)) - statistics.fmean(
        logprob_margin(smollm2, test)
    )
    assert shift == pytest.approx(result.effect, abs=1e-9)
    tuning = result.vector.metadata["tuning"]
    assert tuning["coefficient"] == result.coefficient and tuning["max_tax"] == 0.2
    frame = result.to_pandas()
    assert len(frame) == len(result.candidates) and frame["chosen"].sum() == 1
    chosen = frame[frame["chosen"]].iloc[0]
    assert (chosen["method"], chosen["layers"], chosen["effect"]) == (
        result.method,
        result.layers,
        result.effect,
    )
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


def test_cli_refuses_bad_budget_and_coefficients(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--pairs", "sentiment", "--max-tax", "0", "--out", "v.safetensors"]) == 2
    assert "in (0, 1]" in capsys.readouterr().err
    assert (
        main(["tune", "--pairs", "sentiment", "--coefficients", "1,nan", "--out", "v.safetensors"])
        == 2
    )
    assert "finite" in capsys.readouterr().err


@pytest.mark.real
def test_cli_sweep_and_tune_write_their_results(
    smollm2: acteng.Model,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", small_pairs(train=12, test=4))
    monkeypatch.setattr("acteng.cli.sweep_cmd.load_model_from_args", lambda args: smollm2)
    monkeypatch.setattr("acteng.evaluation.scoring.load_eval", lambda *a, **k: NEUTRAL)
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


def test_cli_tune_checks_the_test_file_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_model(args: object) -> None:
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr("acteng.cli.sweep_cmd.load_model_from_args", no_model)
    vector = tmp_path / "out" / "v.safetensors"
    args = ["tune", "--pairs", "harmful_requests", "--out", str(vector), "--test"]
    assert main([*args, str(tmp_path / "missing.jsonl")]) == 2
    assert "no dataset at" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert main([*args, str(tmp_path / "empty.jsonl")]) == 2
    assert "is empty" in capsys.readouterr().err
    mixed = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "How was it?", "positive": "Great.", "negative": "Awful."}] * 3
    rows.insert(1, {"positive": "Great.", "negative": "Awful."})
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*args, str(mixed)]) == 2
    err = capsys.readouterr().err
    assert "test set 'mixed' mixes" in err and "item(s) 2 " in err
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.real
@pytest.mark.slow
def test_tune_on_bare_pairs(
    smollm2: acteng.Model,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = bare_pairs(small_pairs(train=24, test=6))
    result = tune(
        smollm2,
        data,
        max_tax=0.2,
        methods=("mean_diff",),
        layers=[12],
        coefficients=(2.0,),
        bisection_steps=1,
        neutral=NEUTRAL,
    )
    assert result.effect > 0 and result.tax <= 0.2
    assert "user turn 'Say something.'" in result.to_json()["effect_measure"]
    test = data.split("test")  # the held-out bare pairs, scored as answers to no question
    spec = acteng.SteeringSpec(result.vector, result.coefficient)
    shift = statistics.fmean(logprob_margin(smollm2, test, spec)) - statistics.fmean(
        logprob_margin(smollm2, test)
    )
    assert shift == pytest.approx(result.effect, abs=1e-9)
    # the CLI: bare training pairs, the effect measured on a separate prompted test file
    bare_file = write_pairs(tmp_path / "bare.jsonl", data.split("train"))  # none tested
    test_file = write_pairs(tmp_path / "prompted.jsonl", small_pairs(train=0, test=4))
    monkeypatch.setattr("acteng.cli.sweep_cmd.load_model_from_args", lambda args: smollm2)
    monkeypatch.setattr("acteng.evaluation.scoring.load_eval", lambda *a, **k: NEUTRAL)
    vector = tmp_path / "tuned.safetensors"
    argv = ["tune", "--pairs", str(bare_file), "--test", str(test_file), "--out", str(vector)]
    argv += ["--layers", "12", "--coefficients", "2", "--methods", "mean_diff", "--max-tax", "0.2"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["selected_on"] == acteng.load_pairs(test_file, split="test").provenance()
    assert report["effect_measure"] == "mean log-prob margin shift (nats) on the test pairs"
    assert report["effect"] > 0 and report["tax"] <= 0.2
