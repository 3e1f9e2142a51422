"""RMU on the real default model (a short run): the edit is selective, the adapter loads
through acteng, PEFT and the server, and the model-diff vector finds what RMU wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import acteng
from acteng.cli import main
from acteng.errors import ConfigError
from acteng.evaluation.tax import load_eval
from acteng.training import RMUResult, load_texts, train_rmu, unlearning_domains
from acteng.training.attacks import ablate_edit
from acteng.training.data import default_retain_texts
from acteng.training.diff import diff_vector

pytestmark = [pytest.mark.real, pytest.mark.slow]

STEPS = 40


@pytest.fixture(scope="module")
def domain() -> str:
    return unlearning_domains()[0]


@pytest.fixture(scope="module")
def rmu(smollm2: acteng.Model, domain: str, tmp_path_factory: pytest.TempPathFactory) -> RMUResult:
    return train_rmu(smollm2, domain, tmp_path_factory.mktemp("rmu") / "adapter", steps=STEPS)


@pytest.fixture(scope="module")
def unlearned(rmu: RMUResult) -> acteng.Model:
    return acteng.load_model(adapter=rmu.adapter)


def test_rmu_moves_the_forget_domain_and_not_the_retained_text(
    smollm2: acteng.Model, unlearned: acteng.Model, rmu: RMUResult, domain: str
) -> None:
    """Held-out texts: the domain's test paragraphs move far along the edit's direction
    at the RMU layer, the retain set's unseen neutral paragraphs barely move."""
    layer = rmu.layer
    forget_test = load_texts(domain, split="test")[:24]
    retain_test = load_eval("neutral_text", split="test")
    direction = diff_vector(smollm2, unlearned, forget_test, layers=[layer])[layer]

    def moved(texts: list[str]) -> float:
        base = acteng.record_activations(smollm2, texts, [layer], "mean").rows[layer]
        new = acteng.record_activations(unlearned, texts, [layer], "mean").rows[layer]
        return float(((new - base).norm(dim=-1) / base.norm(dim=-1)).median())

    moved_forget, moved_retain = moved(forget_test), moved(retain_test)
    assert moved_forget > 0.2, moved_forget
    assert moved_forget > 3 * moved_retain, (moved_forget, moved_retain)
    # ablating the edit's own direction undoes most of the move (the shallowness attack)
    spec = ablate_edit(acteng.SteeringVector({layer: direction}), layer)
    with acteng.steer(unlearned, spec):
        attacked = acteng.record_activations(unlearned, forget_test, [layer], "mean").rows[layer]
    base = acteng.record_activations(smollm2, forget_test, [layer], "mean").rows[layer]
    edited = acteng.record_activations(unlearned, forget_test, [layer], "mean").rows[layer]
    assert float((attacked - base).norm()) < 0.5 * float((edited - base).norm())


def test_the_adapter_round_trips_through_peft_and_the_server(
    smollm2: acteng.Model, unlearned: acteng.Model, rmu: RMUResult, domain: str
) -> None:
    from peft import PeftModel
    from starlette.testclient import TestClient

    from tests.server.serving import make_app

    text = load_texts(domain, split="test")[0]
    ids = smollm2.tokenizer(text, return_tensors="pt")["input_ids"]
    # transformers + PEFT directly, on a fresh copy of the base model
    base = acteng.load_model()
    direct = PeftModel.from_pretrained(base.hf, str(rmu.adapter)).eval()
    with torch.no_grad():
        expected = unlearned.hf(input_ids=ids).logits
        got = direct(input_ids=ids).logits
        plain = smollm2.hf(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, expected, atol=1e-2)
    # the server on the adapted model answers like acteng.generate on it
    prompt = "Tell me one fact about the topic of this text: " + text[:200]
    app, _ = make_app(unlearned, rmu.adapter.parent / "home")
    with TestClient(app) as client:
        reply = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                  "temperature": 0},
        )  # fmt: skip
        listed = client.get("/v1/models").json()["data"][0]["acteng"]
    assert reply.status_code == 200, reply.text
    answer = reply.json()["choices"][0]["message"]["content"]
    assert [answer] == acteng.generate(unlearned, prompt, max_new_tokens=16)
    assert listed["adapter"] == rmu.adapter.name  # a client can tell the model is adapted


def test_cli_trains_rmu_and_extracts_its_diff_vector(
    smollm2: acteng.Model, tmp_path: Path, capsys: pytest.CaptureFixture[str], domain: str
) -> None:
    out = tmp_path / "adapter"
    assert main(["train", "rmu", "--forget", domain, "--out", str(out), "--steps", "3",
                 "--json"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["adapter"] == str(out)
    assert (out / "adapter_config.json").is_file()
    assert main(["train", "rmu", "--forget", domain, "--out", str(out), "--steps", "1"]) != 0
    assert "exists" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(load_texts(domain, split="test")[:6]))
    vector = tmp_path / "diff.safetensors"
    assert main(["extract", "--diff-adapter", str(out), "--prompts", str(prompts), "--layers",
                 "5-9", "--out", str(vector), "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["layers"] == [7, 8, 9]
    diff = acteng.SteeringVector.load(vector, model=smollm2)
    # RMU edits blocks 7-9: layers 5 and 6 come out the same in both models and are left
    # out (a zero direction could not be monitored, projected or normalised)
    assert list(diff.layers) == [7, 8, 9]
    assert diff.metadata["diff"]["unchanged_layers"] == [5, 6]
    assert diff.metadata["method"] == "diff_adapter"
    assert float(diff[7].norm()) > 0
    assert main(["analyze", str(vector), "--json"]) == 0  # what it suppresses, every layer
    assert json.loads(capsys.readouterr().out)


def test_default_retain_texts_hold_no_test_items() -> None:
    texts = set(default_retain_texts())
    neutral_test = load_eval("neutral_text", split="test")
    assert not texts & set(neutral_test)


def test_a_bundled_domain_is_not_retained_or_measured_as_neutral_text() -> None:
    """The neutral paragraphs on food and drink fall in the cooking domain: an unlearning run
    on it neither keeps them (they would pull against the forget loss) nor counts them as
    neutral text; other domains' runs keep every paragraph."""
    from acteng.training import neutral_texts

    cooking = [t for t in neutral_texts() if t not in neutral_texts(outside="cooking")]
    assert any(t.startswith("Cheese is made") for t in cooking)
    assert any(t.startswith("Tea is made") for t in neutral_texts(split="test")) and not any(
        t.startswith("Tea is made") for t in neutral_texts(split="test", outside="cooking")
    )
    assert not set(cooking) & set(default_retain_texts("cooking"))
    assert set(cooking) - set(load_eval("neutral_text", split="test")) <= set(
        default_retain_texts()
    )
    with pytest.raises(ConfigError, match="no bundled unlearning domain 'baking'"):
        neutral_texts(outside="baking")
