"""Baking a directional ablation into the weights (weight orthogonalisation).

Following "Refusal in LMs is mediated by a single direction" (Arditi et al. 2024): every
matrix that writes into the residual stream (the token and position embeddings, each
attention output projection and each MLP output projection, with their biases) is
replaced by ``W - r̂ r̂ᵀ W``, so no write has a component along r̂. The baked model then
computes exactly what the unbaked model computes with r̂ projected out of every residual
write (`ablation_sites` lists them, for a hooked reference).

Caveats: tied input/output embeddings are untied first (the unembedding must keep reading
r̂); families that norm sublayer outputs before adding them (Gemma-2/3, OLMo-2) cannot be
baked exactly and are refused; mixture-of-experts MLPs are not handled.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from acteng.errors import ConfigError, UnsupportedError
from acteng.layouts import get_submodule
from acteng.models import Model
from acteng.vectors import SteeringVector

__all__ = ["ablation_sites", "bake"]


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2's Conv1D stores its weight as [in, out], the transpose of nn.Linear.
    return type(module).__name__ == "Conv1D"


def ablation_sites(model: Model) -> list[nn.Module]:
    """Every module whose output is added to the residual stream."""
    layout = model.layout
    if layout.post_sublayer_norm:
        raise UnsupportedError(
            f"{layout.family} norms its attention/MLP outputs before the residual add, so a "
            "direction cannot be baked out of its weights exactly; use "
            "acteng.steer(..., mode='ablate') instead"
        )
    if layout.attn_out is None or layout.mlp_out is None:
        raise UnsupportedError(
            f"the layout of {layout.family} does not name its attention/MLP output "
            "projections; pass a Layout with attn_out and mlp_out to load_model"
        )
    sites = [get_submodule(model.hf, layout.embed)]
    if layout.pos_embed is not None:
        sites.append(get_submodule(model.hf, layout.pos_embed))
    for block in model.blocks:
        sites.append(block.get_submodule(layout.attn_out))
        sites.append(block.get_submodule(layout.mlp_out))
    return sites


def _direction_of(vector: SteeringVector | torch.Tensor, layer: int | None) -> torch.Tensor:
    if isinstance(vector, torch.Tensor):
        return vector
    if layer is None:
        if len(vector.layers) != 1:
            raise ConfigError(
                f"the vector has layers {list(vector.layers)}; pass layer=... to choose the "
                "one direction to bake out of every layer"
            )
        layer = vector.layers[0]
    return vector[layer]


def _untie_unembedding(model: Model) -> None:
    unembed = get_submodule(model.hf, model.layout.unembed)
    embed = get_submodule(model.hf, model.layout.embed)
    weight = getattr(unembed, "weight", None)
    embed_weight = getattr(embed, "weight", None)
    if embed_weight is not None and weight is embed_weight:
        unembed.weight = nn.Parameter(weight.detach().clone())
        config: Any = model.hf.config  # a transformers PretrainedConfig
        config.tie_word_embeddings = False


@torch.no_grad()
def bake(model: Model, vector: SteeringVector | torch.Tensor, *, layer: int | None = None) -> Model:
    """Project one direction out of every residual write, in place; returns `model`.

    >>> refusal = acteng.extract(model, "refusal", layers=[14])
    >>> acteng.bake(model, refusal)   # the model can no longer write that direction
    """
    direction = _direction_of(vector, layer).to(torch.float64)
    if direction.shape != (model.hidden_size,) or not bool(torch.isfinite(direction).all()):
        raise ConfigError(
            f"bake needs a finite direction of width {model.hidden_size}, got "
            f"shape {tuple(direction.shape)}"
        )
    norm = direction.norm()
    if norm == 0:
        raise ConfigError("cannot bake a zero direction")
    unit = direction / norm
    sites = ablation_sites(model)
    adapted = [type(m).__name__ for m in sites if hasattr(m, "base_layer")]
    if adapted:
        raise UnsupportedError(
            f"bake cannot orthogonalise layers wrapped by an adapter ({adapted[0]}): the "
            "adapter would keep writing the direction; merge the adapter into the weights "
            "first (PEFT's merge_and_unload) or steer with mode='ablate'"
        )
    _untie_unembedding(model)
    for module in sites:
        weight = cast(torch.Tensor, module.weight)  # Embedding, Linear, Conv1D: a Parameter
        r = unit.to(weight.device)
        w = weight.to(torch.float64)
        if isinstance(module, nn.Embedding):
            w = w - torch.outer(w @ r, r)  # rows are residual vectors: [vocab, d]
        elif _is_conv1d(module):
            w = w - torch.outer(w @ r, r)  # [in, d]
        else:
            w = w - torch.outer(r, r @ w)  # nn.Linear: [d, in]
        weight.copy_(w.to(weight.dtype))
        bias = getattr(module, "bias", None)
        if bias is not None:
            b = bias.to(torch.float64)
            bias.copy_((b - (b @ r) * r).to(bias.dtype))
    # The weights changed: vectors made from this model must not claim the original.
    model.content_hash = f"{model.content_hash}+baked:{_fingerprint(unit)}"
    return model


def _fingerprint(unit: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(unit.to(torch.float32).cpu().numpy().tobytes()).hexdigest()[:16]
