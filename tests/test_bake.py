"""bake: weight orthogonalisation equals ablating the direction from every residual write."""

from collections.abc import Callable
from typing import Any

import pytest
import torch

import acteng
from acteng.baking import ablation_sites
from acteng.errors import UnsupportedError
from tests.helpers import random_vector


def hooked_ablation_logits(model: acteng.Model, unit: torch.Tensor, ids: Any) -> torch.Tensor:
    def ablate(_m: Any, _i: Any, out: Any) -> Any:
        hidden = out[0] if isinstance(out, tuple) else out
        new = hidden - (hidden @ unit)[..., None] * unit
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handles = [m.register_forward_hook(ablate) for m in ablation_sites(model)]
    try:
        with torch.no_grad():
            return model.hf(**ids).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "phi3"])
def test_baked_equals_hooked_ablation(
    family: str, make_tiny: Callable[[str], acteng.Model]
) -> None:
    import copy

    original = make_tiny(family)
    model = acteng.Model(copy.deepcopy(original.hf), original.tokenizer)
    vector = random_vector(model, [2])
    unit = vector[2] / vector[2].norm()
    ids = model.tokenizer(["A short test sentence for baking."], return_tensors="pt")
    expected = hooked_ablation_logits(model, unit, ids)
    acteng.bake(model, vector)
    with torch.no_grad():
        got = model.hf(**ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        plain = original.hf(**ids).logits
    assert not torch.allclose(got, plain, atol=1e-3)


def test_post_norm_families_are_refused(tiny_gemma3: acteng.Model) -> None:
    with pytest.raises(UnsupportedError, match="mode='ablate'"):
        acteng.bake(tiny_gemma3, random_vector(tiny_gemma3, [1]))


def test_bake_changes_identity_and_refuses_adapters(
    make_tiny: Callable[[str], acteng.Model],
) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    original = make_tiny("llama")
    model = acteng.Model(copy.deepcopy(original.hf), original.tokenizer)
    before = model.content_hash
    acteng.bake(model, random_vector(model, [1]))
    assert model.content_hash.startswith(before + "+baked:")
    lora = get_peft_model(copy.deepcopy(original.hf), LoraConfig(r=2, target_modules=["o_proj"]))
    adapted = acteng.Model(lora.get_base_model(), original.tokenizer)
    with pytest.raises(UnsupportedError, match="merge_and_unload"):
        acteng.bake(adapted, random_vector(adapted, [1]))
