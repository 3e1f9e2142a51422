"""load_model: the embedded default, the cache, sources, adapters and errors."""

import time
import warnings
from pathlib import Path

import pytest
import torch

import acteng
from acteng.errors import ConfigError, ModelLoadError
from acteng.models import cache_dir, quiet_peft
from tests.helpers import random_vector


@pytest.mark.real
def test_default_model(smollm2: acteng.Model) -> None:
    assert smollm2.layout.family == "llama"
    assert (smollm2.num_layers, smollm2.hidden_size) == (30, 576)
    assert smollm2.content_hash.startswith("gguf-sha256:")
    assert type(smollm2.hf).__name__ == "LlamaForCausalLM"
    entries = list((cache_dir() / "models").iterdir())
    assert any((e / "model.safetensors").is_file() for e in entries)
    rendered = smollm2.render_prompt("Hi")
    assert rendered.endswith("<|im_start|>assistant\n") and "Hi" in rendered


@pytest.mark.real
def test_second_load_is_fast(smollm2: acteng.Model) -> None:
    start = time.perf_counter()
    again = acteng.load_model()
    assert time.perf_counter() - start <= 5.0
    ids = smollm2.tokenizer("Hello there", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again.hf(**ids).logits, smollm2.hf(**ids).logits)


@pytest.mark.real
def test_gguf_path_and_dtype(smollm2: acteng.Model) -> None:
    from acteng.models import BUNDLED_MODELS

    model = acteng.load_model(BUNDLED_MODELS["smollm2-135m"](), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model.content_hash == smollm2.content_hash


def test_transformers_folder_and_lora_adapter(tiny_llama: acteng.Model, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama.hf.save_pretrained(base_dir)
    tiny_llama.tokenizer.save_pretrained(base_dir)
    base = acteng.load_model(base_dir)
    ids = tiny_llama.tokenizer("Adapters and steering compose.", return_tensors="pt")
    # A LoRA with non-zero B so the adapter really changes the output.
    torch.manual_seed(0)
    peft_model = get_peft_model(
        acteng.load_model(base_dir).hf,
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(adapter_dir)
    with torch.no_grad():
        expected = peft_model(**ids).logits
    adapted = acteng.load_model(base_dir, adapter=adapter_dir)
    assert adapted.layout.blocks == "model.layers"
    with torch.no_grad():
        got = adapted.hf(**ids).logits
        plain = base.hf(**ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)
    # steering composes with the adapter
    with acteng.steer(adapted, random_vector(adapted, [1]), coefficient=4.0), torch.no_grad():
        assert not torch.allclose(adapted.hf(**ids).logits, got, atol=1e-3)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model at"):
        acteng.load_model("./missing/model.gguf")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("x")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf model"):
        acteng.load_model(text_file)
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        acteng.load_model(tmp_path)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ModelLoadError, match="could not load the GGUF file"):
        acteng.load_model(broken)
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        acteng.load_model(dtype="float8")
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json"):
        acteng.load_model(adapter=tmp_path)


def test_bad_folders_are_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model at"):
        acteng.load_model("./missing")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "nonexistent_arch"}')
    with pytest.raises(ModelLoadError, match="could not load model 'odd'"):
        acteng.load_model(odd)


def test_quiet_peft_hides_only_the_deprecation_peft_triggers(tiny_llama: acteng.Model) -> None:
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_peft():
            wrapped = get_peft_model(tiny_llama.hf, LoraConfig(r=2, target_modules=["q_proj"]))
            warnings.warn("another deprecation", FutureWarning, stacklevel=1)
        wrapped.unload()
    assert [str(w.message) for w in seen] == ["another deprecation"]
