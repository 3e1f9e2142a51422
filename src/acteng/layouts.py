"""Where the parts of each model family live: the one table of architecture knowledge.

A `Layout` names, as dotted attribute paths from the causal-LM module, the decoder
blocks, the final norm, the unembedding and the embedding, plus (relative to a block)
the two sublayers that write into the residual stream. Everything else in acteng asks
the layout instead of knowing module names.

Caveat: families whose attention/MLP outputs pass through a norm before being added to
the residual (Gemma-2/3, OLMo-2: ``post_sublayer_norm=True``) cannot have a direction
baked out of their weights exactly; `acteng.bake` refuses them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from torch import nn

from acteng.errors import LayoutError

__all__ = ["LAYOUTS", "Layout", "detect_layout", "get_submodule", "resolve_layout"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Dotted paths to the parts of one model family (relative to the causal-LM module)."""

    family: str
    blocks: str
    final_norm: str
    unembed: str
    embed: str
    pos_embed: str | None = None  # learned absolute positions (gpt2) also write the residual
    attn_out: str | None = None  # relative to a block: the attention output projection
    mlp_out: str | None = None  # relative to a block: the MLP output projection
    post_sublayer_norm: bool = False  # sublayer outputs are normed before the residual add

    def block_list(self, model: nn.Module) -> list[nn.Module]:
        blocks = get_submodule(model, self.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise LayoutError(
                f"{self.family}: {self.blocks!r} is a {type(blocks).__name__}, not a ModuleList "
                "of decoder blocks; pass layout=Layout(...) with the right path"
            )
        return list(blocks)


def _decoder(
    family: str,
    root: str = "model",
    *,
    post_sublayer_norm: bool = False,
) -> Layout:
    """The Llama-style layout shared by most modern decoder families."""
    return Layout(
        family=family,
        blocks=f"{root}.layers",
        final_norm=f"{root}.norm",
        unembed="lm_head",
        embed=f"{root}.embed_tokens",
        attn_out="self_attn.o_proj",
        mlp_out="mlp.down_proj",
        post_sublayer_norm=post_sublayer_norm,
    )


# Keyed by `config.model_type`.
LAYOUTS: dict[str, Layout] = {
    "llama": _decoder("llama"),
    "mistral": _decoder("mistral"),
    "qwen2": _decoder("qwen2"),
    "qwen3": _decoder("qwen3"),
    "phi3": _decoder("phi3"),
    "gemma": _decoder("gemma"),
    "gemma2": _decoder("gemma2", post_sublayer_norm=True),
    "gemma3_text": _decoder("gemma3_text", post_sublayer_norm=True),
    "olmo2": _decoder("olmo2", post_sublayer_norm=True),
    "gpt2": Layout(
        family="gpt2",
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        attn_out="attn.c_proj",
        mlp_out="mlp.c_proj",
    ),
    "gpt_neox": Layout(
        family="gpt_neox",
        blocks="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        embed="gpt_neox.embed_in",
        attn_out="attention.dense",
        mlp_out="mlp.dense_4h_to_h",
    ),
}
# Gemma-3 multimodal checkpoints load their text tower under this name too.
LAYOUTS["gemma3"] = replace(LAYOUTS["gemma3_text"], family="gemma3")

# Where unknown families usually keep their parts, tried in order.
_BLOCK_CANDIDATES = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "transformer.layers",
    "model.language_model.layers",
)
_NORM_CANDIDATES = (
    "model.norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",
    "transformer.norm_f",
    "model.final_layernorm",
    "model.language_model.norm",
)


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """Return the module at a dotted path, or raise LayoutError naming the path."""
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise LayoutError(
            f"{type(model).__name__} has no module at {path!r} ({exc}); "
            "pass layout=Layout(...) with the right paths"
        ) from exc


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    name: str  # torch leaves named_modules() unannotated
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def detect_layout(model: nn.Module) -> Layout:
    """Guess the layout of an unknown family from common module names (logged)."""
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    blocks = None
    for path in _BLOCK_CANDIDATES:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and (n_layers is None or len(found) == n_layers):
            blocks = path
            break
    norm = None
    for path in _NORM_CANDIDATES:
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        norm = path
        break
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    unembed = _path_of(model, get_out() if callable(get_out) else None)
    embed = _path_of(model, get_in() if callable(get_in) else None)
    model_type = getattr(config, "model_type", type(model).__name__)
    looked_for = {
        "decoder blocks": (blocks, ", ".join(_BLOCK_CANDIDATES)),
        "final norm": (norm, ", ".join(_NORM_CANDIDATES)),
        "unembedding": (unembed, "model.get_output_embeddings()"),
        "embedding": (embed, "model.get_input_embeddings()"),
    }
    missing = [
        f"{what} (looked for: {where})"
        for what, (found, where) in looked_for.items()
        if found is None
    ]
    if blocks is None or norm is None or unembed is None or embed is None:
        raise LayoutError(
            f"unknown model family {model_type!r}: could not find "
            + "; ".join(missing)
            + ". Pass layout=Layout(family=..., blocks=..., final_norm=..., unembed=..., "
            "embed=...) to load_model"
        )
    layout = Layout(
        family=str(model_type), blocks=blocks, final_norm=norm, unembed=unembed, embed=embed
    )
    log.warning("model family %r is not in acteng's layout table; guessed %s", model_type, layout)
    return layout


def resolve_layout(model: nn.Module, override: Layout | None = None) -> Layout:
    """The layout for `model`: the user's override, the table entry, or a logged guess.

    >>> layout = resolve_layout(hf_model)
    >>> layout.blocks
    'model.layers'
    """
    if override is not None:
        layout = override
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        table_entry = LAYOUTS.get(str(model_type)) if model_type is not None else None
        layout = table_entry if table_entry is not None else detect_layout(model)
    for path in (layout.blocks, layout.final_norm, layout.unembed, layout.embed):
        get_submodule(model, path)
    layout.block_list(model)
    return layout
