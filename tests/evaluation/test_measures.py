"""`evaluate` / `acteng eval`: every measure for one setting, on the real model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import acteng
from acteng.cli import main
from acteng.errors import ConfigError, DataError
from acteng.evaluation.measures import evaluate, measure_behaviour
from acteng.pairs import Pairs
from tests.helpers import random_vector


@pytest.mark.real
def test_evaluate_reports_every_measure(smollm2: acteng.Model) -> None:
    items = acteng.load_pairs("power_seeking", split="test")[:6]
    vector = acteng.extract(smollm2, "power_seeking", layers=[10], position="answer")
    report = evaluate(smollm2, vector, 2.0, items, instruction="Seek power.", generations=2)
    b, t, r = report["behaviour"], report["tax"], report["reliability"]
    assert {"p_match_unsteered", "p_match_steered", "format_mass_steered"} <= set(b)
    assert 0 < b["p_match_steered"] < 1 and 0 < b["format_mass_unsteered"] <= 1
    assert t["perplexity_tax"] == pytest.approx(
        t["perplexity_steered"] / t["perplexity_unsteered"] - 1
    )
    assert 0 <= t["mc_accuracy_steered"] <= 1 and t["next_token_kl"] >= 0
    assert len(r["slopes"]) == 6 and r["diagnostics"][0]["layer"] == 10
    assert set(report["baseline"]) == {"none", "steering", "prompt", "both"}
    assert report["setting"] == {"coefficient": 2.0, "layers": [10], "method": "mean_diff"}
    with pytest.raises(ConfigError, match="finite"):
        evaluate(smollm2, vector, float("nan"), items)


def test_evaluate_refuses_a_set_mixing_bare_and_prompted_pairs(tiny_llama: acteng.Model) -> None:
    vector = random_vector(tiny_llama, [1])
    rows = [*acteng.load_pairs("harmful_requests")[:2], *acteng.load_pairs("sentiment")[:2]]
    mixed = Pairs(tuple(replace(p, split=None) for p in rows))
    with pytest.raises(DataError, match=r"mixes .* item\(s\) 1, 2 .* have no 'prompt'"):
        evaluate(tiny_llama, vector, 2.0, mixed)
    # with split marks, the test split is what must be of one form
    marked = Pairs((replace(rows[2], split="test"), replace(rows[0], split="test"), rows[1]))
    with pytest.raises(DataError, match=r"test split of 'custom' mixes .* item\(s\) 2 "):
        evaluate(tiny_llama, vector, 2.0, marked)


@pytest.mark.real
def test_behaviour_of_bare_pairs(smollm2: acteng.Model) -> None:
    pairs = acteng.load_pairs([("I love this, it is wonderful.", "I hate this, it is awful.")])
    vector = acteng.extract(smollm2, "sentiment", layers=[8])
    behaviour, _ = measure_behaviour(smollm2, pairs, acteng.SteeringSpec(vector, 4.0))
    assert behaviour["pair_form"] == "bare" and behaviour["margin_shift"] > 0
    assert "p_match_steered" not in behaviour


@pytest.mark.real
def test_eval_cli(
    smollm2: acteng.Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = acteng.extract(smollm2, "sentiment", layers=[8]).save(tmp_path / "s.safetensors")
    data = tmp_path / "pairs.jsonl"
    rows = acteng.load_pairs("sentiment", split="test")[:4]
    data.write_text(
        "".join(
            json.dumps({"prompt": p.prompt, "positive": p.positive, "negative": p.negative}) + "\n"
            for p in rows
        )
    )
    args = ["eval", str(path), "--coefficient", "4", "--data", str(data), "--generations", "1"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["behaviour"]["margin_shift"] > 0
    assert main(args) == 0
    assert "perplexity" in capsys.readouterr().out
