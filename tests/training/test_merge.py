"""Merging an adapter into its base model: the saved folder loads without PEFT and
computes what the model with the adapter computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import acteng
from acteng.cli import main
from acteng.errors import ConfigError
from acteng.training import merge_adapter, read_provenance, save_weight_edits


@pytest.fixture()
def base_and_adapter(tiny_llama: acteng.Model, tmp_path: Path) -> tuple[Path, Path]:
    """A tiny model saved as a folder, and an acteng adapter trained for that folder."""
    base = tmp_path / "base"
    tiny_llama.hf.save_pretrained(str(base))
    tiny_llama.tokenizer.save_pretrained(str(base))
    model = acteng.load_model(base)
    generator = torch.Generator().manual_seed(0)
    edits = {
        f"{model.layout.blocks}.{layer}.mlp.down_proj": 0.2
        * torch.randn(model.blocks[layer].mlp.down_proj.weight.shape, generator=generator)
        for layer in (1, 2)
    }
    return base, save_weight_edits(model, edits, tmp_path / "adapter", {"method": "test"})


def _logits(model: acteng.Model) -> torch.Tensor:
    ids = model.tokenizer("The cat sat on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        return model.hf(ids).logits


def test_merged_folder_computes_what_the_adapter_does(
    base_and_adapter: tuple[Path, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    base, adapter = base_and_adapter
    out = merge_adapter(adapter, tmp_path / "merged", source=base)
    assert {"config.json", "model.safetensors", "acteng_merged.json"} <= {
        p.name for p in out.iterdir()
    }
    adapted = _logits(acteng.load_model(base, adapter=adapter))
    merged = acteng.load_model(out)
    torch.testing.assert_close(_logits(merged), adapted, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logits(acteng.load_model(base)), adapted, atol=1e-3)
    plain = AutoModelForCausalLM.from_pretrained(str(out))  # no PEFT, no acteng
    assert not any("lora" in name for name, _ in plain.named_parameters())
    record = json.loads((out / "acteng_merged.json").read_text())
    assert record["merged_layers"] == 2 and record["training"]["method"] == "test"


def test_merge_cli_and_bad_input(
    base_and_adapter: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    args = ["train", "merge", "--adapter", str(adapter), "--out", str(out), "--model", str(base)]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(out)
    before = (out / "model.safetensors").read_bytes()
    assert main(args) == 2  # exists: --force is needed
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() == before  # same merge, same bytes
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a model folder"):
        merge_adapter(adapter, not_a_model, source=base, force=True)
    assert (not_a_model / "keep.txt").read_text() == "mine"
    bad = ["train", "merge", "--adapter", str(tmp_path), "--out", str(tmp_path / "x")]
    assert main(bad) == 2
    assert "adapter_config.json" in capsys.readouterr().err


@pytest.mark.real
def test_merging_into_the_default_gguf_model(smollm2: acteng.Model, tmp_path: Path) -> None:
    """The embedded model (read from GGUF) with an edit, merged: a safetensors folder that
    answers as the model with the adapter does."""
    layer = 5
    path = f"{smollm2.layout.blocks}.{layer}.mlp.down_proj"
    shape = smollm2.blocks[layer].mlp.down_proj.weight.shape
    edit = 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
    adapter = save_weight_edits(smollm2, {path: edit}, tmp_path / "adapter", {"method": "test"})
    out = merge_adapter(adapter, tmp_path / "merged")
    adapted = _logits(acteng.load_model(adapter=adapter))
    torch.testing.assert_close(_logits(acteng.load_model(out)), adapted, atol=1e-3, rtol=1e-3)


def test_a_damaged_adapter_folder_is_named_not_a_traceback(
    base_and_adapter: tuple[Path, Path], tmp_path: Path
) -> None:
    """A missing weights file sent PEFT to the hub (a network error offline), a cut one
    raised safetensors' own error; both are now ModelLoadError naming the folder."""
    import shutil

    from acteng.errors import ModelLoadError

    base, adapter = base_and_adapter
    weights = adapter / "adapter_model.safetensors"
    for name, damage, match in (
        ("cut", lambda d: (d / weights.name).write_bytes(weights.read_bytes()[:50]), "damaged"),
        ("gone", lambda d: (d / weights.name).unlink(), "no weights"),
        ("config", lambda d: (d / "adapter_config.json").write_text("{bad"), "not valid JSON"),
    ):
        broken = shutil.copytree(adapter, tmp_path / name)
        damage(broken)
        with pytest.raises(ModelLoadError, match=match):
            acteng.load_model(base, adapter=broken)


def test_an_adapter_that_stopped_early_loads_with_a_warning(
    base_and_adapter: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    base, adapter = base_and_adapter
    record = read_provenance(adapter)
    record["training"] = {"steps_done": 19, "interrupted": True}
    record["hyperparameters"] = {"steps": 100}
    (adapter / "acteng_training.json").write_text(json.dumps(record))
    acteng.load_model(base, adapter=adapter)
    assert "stopped early, after 19 of 100 steps" in caplog.text
