"""Plain helpers shared by the tests: tiny-model configs, random vectors, hook counting.

Fixtures live in conftest.py; tests import these from here (not from conftest).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import acteng
from acteng.detectors import Detector, load_detector
from acteng.library import load_vector
from acteng.recipes import build_bundled

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


def spread_weights(hf: torch.nn.Module) -> None:
    """Random init gives near-zero norms' weights in some families; make every part matter."""
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name or "ln" in name:
                param.add_(0.1 * torch.randn_like(param))


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


def check_rebuild(model: acteng.Model, name: str) -> None:
    """Bundled file `name` is what its recipe builds from the team's data (same layers,
    directions to cosine 0.999 and norms to 1 %; a detector's region, pooling, threshold
    and calibration too), not hand-made."""
    shipped = load_vector(name, model=model)
    built = build_bundled(model, name)
    rebuilt = built.directions if isinstance(built, Detector) else built
    assert shipped.layers == rebuilt.layers
    for x in shipped.layers:
        cosine = torch.nn.functional.cosine_similarity(
            shipped[x].double(), rebuilt[x].double(), dim=0
        )
        assert float(cosine) > 0.999, (x, float(cosine))
        assert float(shipped[x].norm()) == pytest.approx(float(rebuilt[x].norm()), rel=1e-2)
    assert shipped.metadata["name"] == name
    if isinstance(built, Detector):
        det = load_detector(name, model=model)
        assert det.region == built.region
        assert det.pooling == built.pooling
        assert det.threshold == pytest.approx(built.threshold, abs=1e-3)
        assert det.calibration == pytest.approx(built.calibration)
