"""RMU and its adapter folders on a tiny random model: the round trip is exact, the model
passed in is left as it was, bad input is refused, Ctrl-C and NaN keep a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import acteng
from acteng.errors import ConfigError, DataError, TrainingError
from acteng.training import read_provenance, record_figures, save_weight_edits, train_rmu
from acteng.training import rmu as rmu_module

FORGET = [
    f"The planet number {i} circles its star once every {i + 3} long years." for i in range(12)
]
RETAIN = [f"Bread dough rises for {i + 1} hours before it goes into the oven." for i in range(12)]


def peft_applied(model: acteng.Model, folder: Path) -> Any:
    """`folder` applied by PEFT itself (what a user without acteng would do), merged."""
    import copy

    from peft import PeftModel

    base = copy.deepcopy(model.hf)
    return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()


def test_saved_edits_are_a_peft_adapter_that_reproduces_them(
    tiny_llama: acteng.Model, tmp_path: Path
) -> None:
    generator = torch.Generator().manual_seed(0)
    blocks = tiny_llama.layout.blocks
    edits = {}
    for layer in (1, 2):
        weight = tiny_llama.blocks[layer].mlp.down_proj.weight
        edits[f"{blocks}.{layer}.mlp.down_proj"] = 0.1 * torch.randn(
            weight.shape, generator=generator
        )
    folder = save_weight_edits(tiny_llama, edits, tmp_path / "adapter", {"method": "test"})
    assert {p.name for p in folder.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "acteng_training.json",
    }
    merged = peft_applied(tiny_llama, folder)
    for layer in (1, 2):
        expected = (
            tiny_llama.blocks[layer].mlp.down_proj.weight + edits[f"{blocks}.{layer}.mlp.down_proj"]
        )
        got = merged.model.layers[layer].mlp.down_proj.weight
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    untouched = merged.model.layers[0].mlp.down_proj.weight
    assert torch.equal(untouched, tiny_llama.blocks[0].mlp.down_proj.weight)
    provenance = read_provenance(folder)
    assert provenance["method"] == "test"
    assert provenance["model"] == tiny_llama.identity()
    record_figures(folder, {"forget_mc": 0.3})
    record_figures(folder, {"retain_mc": 0.5})
    assert read_provenance(folder)["figures"] == {"forget_mc": 0.3, "retain_mc": 0.5}


@pytest.mark.parametrize("projection", ["mlp.down_proj", "mlp.up_proj"])
def test_saved_factors_multiply_back_to_the_edit_exactly(
    tiny_llama: acteng.Model, tmp_path: Path, projection: str
) -> None:
    """Both orientations (out < in, out > in): B @ A is the edit bit for bit, with the
    rank the smaller side, and no factorisation to wait for on a large model."""
    from safetensors.torch import load_file

    path = f"{tiny_llama.layout.blocks}.1.{projection}"
    weight = tiny_llama.hf.get_submodule(path).weight
    edit = 0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    folder = save_weight_edits(tiny_llama, {path: edit}, tmp_path / "adapter", {"method": "t"})
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    a = tensors[f"base_model.model.{path}.lora_A.weight"]
    b = tensors[f"base_model.model.{path}.lora_B.weight"]
    assert a.shape[0] == b.shape[1] == min(weight.shape)
    assert torch.equal(b @ a, edit)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == min(weight.shape)


def test_train_rmu_writes_an_adapter_and_leaves_the_model_alone(
    tiny_llama: acteng.Model, tmp_path: Path
) -> None:
    before = {k: v.clone() for k, v in tiny_llama.hf.state_dict().items()}
    flags = {k: p.requires_grad for k, p in tiny_llama.hf.named_parameters()}
    seen: list[int] = []
    result = train_rmu(
        tiny_llama,
        FORGET,
        tmp_path / "rmu",
        retain=RETAIN,
        layer=2,
        steps=6,
        lr=1e-2,
        checkpoint_every=4,
        on_step=lambda step, _record: seen.append(step),
    )
    assert seen == [1, 2, 3, 4, 5, 6] and result.steps == 6
    assert result.update_layers == (0, 1, 2)
    after = tiny_llama.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k: p.requires_grad for k, p in tiny_llama.hf.named_parameters()} == flags
    assert all(p.grad is None for p in tiny_llama.hf.parameters())
    record = read_provenance(result.adapter)
    assert record["method"] == "rmu"
    assert record["training"]["steps_done"] == 6
    assert record["hyperparameters"]["update_layers"] == [0, 1, 2]
    assert record["data"]["forget"]["texts"] == len(FORGET)
    assert record["data"]["forget"]["hash"].startswith("sha256:")
    config = json.loads((result.adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == [
        f"model.layers.{x}.mlp.down_proj" for x in (0, 1, 2)
    ]
    # the adapted model moved the forget texts' layer-2 activations more than the retain
    # texts' (6 steps on a random model: the direction is there, not the size)
    merged = peft_applied(tiny_llama, result.adapter)
    adapted = acteng.Model(merged, tiny_llama.tokenizer)
    base_f = acteng.record_activations(tiny_llama, FORGET, [2], "mean").rows[2]
    base_r = acteng.record_activations(tiny_llama, RETAIN, [2], "mean").rows[2]
    new_f = acteng.record_activations(adapted, FORGET, [2], "mean").rows[2]
    new_r = acteng.record_activations(adapted, RETAIN, [2], "mean").rows[2]
    moved_f = float(((new_f - base_f).norm(dim=-1) / base_f.norm(dim=-1)).mean())
    moved_r = float(((new_r - base_r).norm(dim=-1) / base_r.norm(dim=-1)).mean())
    assert moved_f > moved_r, (moved_f, moved_r)


def test_same_seed_same_adapter(tiny_llama: acteng.Model, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    kw: dict[str, Any] = {"retain": RETAIN, "layer": 2, "steps": 3, "lr": 1e-2}
    a = train_rmu(tiny_llama, FORGET, tmp_path / "a", **kw)
    b = train_rmu(tiny_llama, FORGET, tmp_path / "b", **kw)
    ta = load_file(str(a.adapter / "adapter_model.safetensors"))
    tb = load_file(str(b.adapter / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layer": 9}, ConfigError, "out of range"),
        ({"layer": 2, "update_layers": [3]}, ConfigError, "at or below"),
        ({"lr": float("nan")}, ConfigError, "lr must be"),
        ({"alpha": 0.0}, ConfigError, "alpha must be"),
        ({"steps": 0}, ConfigError, "steps"),
        ({"retain": []}, DataError, "no texts"),
        ({"retain": [FORGET[0], *RETAIN]}, DataError, "both the forget and the retain"),
        ({"retain": [f" {FORGET[0]}  ", *RETAIN]}, DataError, "both the forget"),  # spacing
        ({"retain": "no-such-file.jsonl"}, ConfigError, "neither a file"),
    ],
)
def test_bad_input_is_refused_before_training(
    tiny_llama: acteng.Model, tmp_path: Path, kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        train_rmu(tiny_llama, FORGET, tmp_path / "x", **{"retain": RETAIN, "layer": 2, **kwargs})
    assert not (tmp_path / "x").exists()


def test_ctrl_c_keeps_the_last_finished_step(tiny_llama: acteng.Model, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in tiny_llama.hf.state_dict().items()}

    def interrupt(step: int, _record: dict[str, float]) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_rmu(tiny_llama, FORGET, tmp_path / "rmu", retain=RETAIN, layer=2, steps=50,
                  on_step=interrupt)  # fmt: skip
    record = read_provenance(tmp_path / "rmu")
    assert record["training"] == {**record["training"], "steps_done": 3, "interrupted": True}
    after = tiny_llama.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_nan_loss_stops_with_the_last_good_checkpoint(
    tiny_llama: acteng.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = rmu_module._masked_mse

    def poisoned(hidden: torch.Tensor, target: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real(hidden, target, used)
        return loss * float("nan") if calls["n"] > 2 * 4 else loss  # two losses a step

    monkeypatch.setattr(rmu_module, "_masked_mse", poisoned)
    with pytest.raises(TrainingError, match="non-finite at step 5") as caught:
        train_rmu(tiny_llama, FORGET, tmp_path / "rmu", retain=RETAIN, layer=2, steps=20)
    assert caught.value.checkpoint == str(tmp_path / "rmu")
    record = read_provenance(tmp_path / "rmu")
    assert record["training"]["steps_done"] == 3  # step 4's weights gave the NaN


def test_an_adapter_trained_for_another_model_is_refused(
    tiny_llama: acteng.Model, tmp_path: Path
) -> None:
    """load_model reads the provenance before PEFT runs: a tiny model's RMU adapter does
    not load on the default model."""
    from acteng.errors import IncompatibleVectorError

    result = train_rmu(tiny_llama, FORGET, tmp_path / "rmu", retain=RETAIN, layer=2, steps=1)
    with pytest.raises(IncompatibleVectorError, match="trained on"):
        acteng.load_model(adapter=result.adapter)


def test_a_model_with_an_adapter_is_refused(
    tiny_llama: acteng.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter trained over another would never load (load_model applies one)."""
    from acteng.training import train_circuit_breaker

    # the tiny model is shared by the session's tests: patched, so that it is put back
    monkeypatch.setattr(
        tiny_llama, "content_hash", tiny_llama.content_hash + "+adapter:rmu-cooking"
    )
    with pytest.raises(ConfigError, match="carries 'rmu-cooking'; merge that adapter"):
        train_rmu(tiny_llama, FORGET, tmp_path / "x", retain=RETAIN, layer=2)
    with pytest.raises(ConfigError, match="carries 'rmu-cooking'; merge that adapter"):
        train_circuit_breaker(tiny_llama, tmp_path / "x", harmful=["a"], retain=["b"])
    assert not (tmp_path / "x").exists()
