"""The layout table: every listed family resolves, unknown models fail helpfully."""

from collections.abc import Callable

import pytest
from torch import nn

import acteng
from acteng.errors import LayoutError
from acteng.layouts import LAYOUTS, Layout, detect_layout, resolve_layout
from tests.helpers import FAMILIES

REQUIRED = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "gpt2",
    "gpt_neox",
    "phi3",
    "olmo2",
}


def test_table_covers_required_families() -> None:
    assert set(LAYOUTS) >= REQUIRED


@pytest.mark.parametrize("family", FAMILIES)
def test_family_resolves(family: str, make_tiny: Callable[[str], acteng.Model]) -> None:
    model = make_tiny(family)
    assert model.layout is LAYOUTS[family]
    assert model.num_layers == 4
    assert model.hidden_size == 64
    # The table and the guess for unknown families agree on the parts they both find.
    guess = detect_layout(model.hf)
    assert guess.blocks == model.layout.blocks
    assert guess.final_norm == model.layout.final_norm


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stack = nn.ModuleList([nn.Linear(4, 4)])


def test_unknown_family_lists_what_was_looked_for() -> None:
    with pytest.raises(LayoutError) as info:
        resolve_layout(Unknown())
    message = str(info.value)
    assert "model.layers" in message and "transformer.h" in message
    assert "final norm" in message and "layout=Layout" in message


def test_override_is_used(tiny_llama: acteng.Model) -> None:
    custom = Layout(
        family="custom",
        blocks="model.layers",
        final_norm="model.norm",
        unembed="lm_head",
        embed="model.embed_tokens",
    )
    wrapped = acteng.Model(tiny_llama.hf, tiny_llama.tokenizer, layout=custom)
    assert wrapped.layout is custom


def test_bad_override_path_is_named(tiny_llama: acteng.Model) -> None:
    bad = Layout(
        family="x",
        blocks="model.blocks",
        final_norm="model.norm",
        unembed="lm_head",
        embed="model.embed_tokens",
    )
    with pytest.raises(LayoutError, match=r"model\.blocks"):
        acteng.Model(tiny_llama.hf, tiny_llama.tokenizer, layout=bad)


def test_unknown_family_is_guessed(
    tiny_llama: acteng.Model, caplog: pytest.LogCaptureFixture
) -> None:
    hf = tiny_llama.hf
    original = hf.config.model_type
    try:
        type(hf.config).model_type = "brand_new_family"
        with caplog.at_level("WARNING"):
            layout = resolve_layout(hf)
        assert layout.blocks == "model.layers"
        assert "not in acteng's layout table" in caplog.text
    finally:
        type(hf.config).model_type = original
