"""Shared fixtures: tiny random models of several families, and the real bundled models.

Tiny models reuse the real SmolLM2 tokenizer (architecture and tokenizer are independent),
so every text-level API runs on them quickly.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from collections.abc import Callable
from typing import Any

import pytest
import torch

import acteng

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}

# Per family: config overrides that make a tiny but complete model.
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": 2},
    "mistral": {"num_key_value_heads": 2, "sliding_window": None},
    "qwen2": {"num_key_value_heads": 2},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 16},
    "phi3": {"num_key_value_heads": 2, "pad_token_id": 0},
    "gemma2": {"num_key_value_heads": 1, "head_dim": 16, "sliding_window": 16},
    "gemma3_text": {"num_key_value_heads": 1, "head_dim": 16, "sliding_window": 16},
    "olmo2": {"num_key_value_heads": 2},
    "gpt2": {"n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 512},
    "gpt_neox": {"num_key_value_heads": 4},
}
FAMILIES = tuple(FAMILY_CONFIGS)


@pytest.fixture(scope="session")
def smollm2() -> acteng.Model:
    """The embedded default model, SmolLM2-135M-Instruct (real weights)."""
    return acteng.load_model()


@pytest.fixture(scope="session")
def gemma3() -> acteng.Model:
    """Gemma-3-270M (real weights), the second architecture."""
    return acteng.load_model("gemma3-270m")


@pytest.fixture(scope="session")
def tokenizer(smollm2: acteng.Model) -> Any:
    return smollm2.tokenizer


@pytest.fixture(scope="session")
def make_tiny(tokenizer: Any) -> Callable[[str], acteng.Model]:
    """Build (and cache) a tiny random model of a family, wrapped in acteng.Model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    built: dict[str, acteng.Model] = {}

    def make(family: str) -> acteng.Model:
        if family not in built:
            torch.manual_seed(0)
            kwargs = {**TINY, **FAMILY_CONFIGS[family], "vocab_size": len(tokenizer)}
            if family == "gpt2":
                kwargs = {k: v for k, v in kwargs.items() if k not in TINY}
            config = AutoConfig.for_model(family, **kwargs)
            hf = AutoModelForCausalLM.from_config(config).eval()
            _spread_weights(hf)
            built[family] = acteng.Model(hf, tokenizer, name=f"tiny-{family}")
        return built[family]

    return make


def _spread_weights(hf: torch.nn.Module) -> None:
    """Random init gives near-zero norms' weights in some families; make every part matter."""
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name or "ln" in name:
                param.add_(0.1 * torch.randn_like(param))


@pytest.fixture()
def tiny_llama(make_tiny: Callable[[str], acteng.Model]) -> acteng.Model:
    return make_tiny("llama")


@pytest.fixture()
def tiny_gemma3(make_tiny: Callable[[str], acteng.Model]) -> acteng.Model:
    return make_tiny("gemma3_text")


def random_vector(
    model: acteng.Model, layers: list[int], seed: int = 0, scale: float = 1.0
) -> acteng.SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return acteng.SteeringVector(
        {layer: scale * torch.randn(model.hidden_size, generator=g) for layer in layers},
        {"model": model.identity(), "method": "random"},
    )


def block_output_hook(
    direction: torch.Tensor, coefficient: float, keep: Callable[[int], bool] | None = None
) -> Callable[..., Any]:
    """A plain torch hook adding c*v to a block's output: the independent reference."""

    def hook(_m: Any, _i: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        delta = coefficient * direction.to(hidden.dtype)
        if keep is None:
            new = hidden + delta
        else:
            mask = torch.tensor([keep(p) for p in range(hidden.shape[1])])
            new = hidden + mask[None, :, None].to(hidden.dtype) * delta
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def hook_count(model: acteng.Model) -> int:
    """All forward hooks on the model (transformers adds some of its own: compare counts)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())
