"""Optimised steering vectors: the objective goes down and the vector promotes its target."""

from __future__ import annotations

import pytest
import torch

import acteng
from acteng.errors import ConfigError
from acteng.optimization import optimize_vector

TARGET = "Certainly not, I refuse."


def _target_logprob(
    model: acteng.Model, prompt: str, vector: acteng.SteeringVector | None
) -> float:
    tok = model.tokenizer
    prompt_ids = tok(model.render_prompt(prompt), add_special_tokens=False)["input_ids"]
    target = tok(TARGET, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + target])
    context = acteng.steer(model, vector) if vector is not None else None
    with torch.no_grad():
        if context is None:
            logits = model.hf(ids).logits
        else:
            with context:
                logits = model.hf(ids).logits
    logprobs = torch.log_softmax(logits[0, len(prompt_ids) - 1 : -1].double(), -1)
    return float(logprobs[torch.arange(len(target)), torch.tensor(target)].sum())


def test_promotes_the_positive_completions(tiny_llama: acteng.Model) -> None:
    pairs = [
        {"prompt": f"Question number {i}?", "positive": TARGET, "negative": "Sure."}
        for i in range(8)
    ]
    weights = [p.detach().clone() for p in tiny_llama.hf.parameters()]
    vector = optimize_vector(tiny_llama, pairs, layer=1, steps=30, lr=0.2, batch_size=4)
    info = vector.metadata["optimization"]
    # a random tiny model's logits span little, so the loss can only fall so far
    assert info["last_loss"] < info["first_loss"] - 0.2, info
    assert vector.layers == (1,) and vector.metadata["method"] == "optimize"
    # the weights are untouched and carry no gradient
    for before, after in zip(weights, tiny_llama.hf.parameters(), strict=True):
        assert torch.equal(before, after) and after.grad is None
    unseen = "A question it never saw?"
    assert _target_logprob(tiny_llama, unseen, vector) > _target_logprob(tiny_llama, unseen, None)
    again = optimize_vector(tiny_llama, pairs, layer=1, steps=30, lr=0.2, batch_size=4)
    torch.testing.assert_close(again[1], vector[1])  # seeded: same result


def test_bad_arguments(tiny_llama: acteng.Model) -> None:
    pairs = [{"prompt": "Q?", "positive": "A.", "negative": "B."}] * 2
    with pytest.raises(ConfigError, match="out of range"):
        optimize_vector(tiny_llama, pairs, layer=9)
    with pytest.raises(ConfigError, match="needs a 'prompt'"):
        optimize_vector(tiny_llama, [{"positive": "a", "negative": "b"}] * 2, layer=1)
    with pytest.raises(ConfigError, match="lr must be"):
        optimize_vector(tiny_llama, pairs, layer=1, lr=float("nan"))


@pytest.mark.real
def test_refusal_vector_makes_the_real_model_refuse(smollm2: acteng.Model) -> None:
    """The bundled optimised refusal vector turns compliance into refusal on new prompts."""
    from acteng.evaluation.metrics import is_refusal
    from acteng.library import load_vector

    refusal = load_vector("refusal", model=smollm2)
    prompts = [p.negative for p in acteng.load_pairs("harmful_requests", split="test")][:16]
    plain = acteng.generate(smollm2, prompts, max_new_tokens=16)
    steered = acteng.generate(smollm2, prompts, refusal, coefficient=1.0, max_new_tokens=16)
    assert sum(map(is_refusal, plain)) <= 2
    assert sum(map(is_refusal, steered)) >= 14, steered
