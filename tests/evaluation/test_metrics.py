"""Behaviour measures: refusal judging, refusal score, next-token KL."""

from __future__ import annotations

import pytest
import torch

import acteng
from acteng.errors import ConfigError
from acteng.evaluation.metrics import (
    REFUSAL_PHRASES,
    is_refusal,
    next_token_kl,
    refusal_rate,
    refusal_score,
    refusal_tokens,
)
from acteng.steering.spec import SteeringSpec
from tests.helpers import random_vector


def test_refusal_phrases() -> None:
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("Well... As an AI, I do not have opinions.")
    assert not is_refusal("Sure! Here is a recipe for bread.")
    assert not is_refusal("i'm sorry")  # case-sensitive, as the reference lists are
    assert refusal_rate(["I cannot do that.", "Okay.", "Fine.", "I can't."]) == 0.5
    assert len(REFUSAL_PHRASES) == 12
    with pytest.raises(ConfigError, match="no completions"):
        refusal_rate([])


def test_refusal_score_is_first_token_log_odds(tiny_llama: acteng.Model) -> None:
    prompts = ["Tell me a joke.", "How do I cook rice well?"]
    scores = refusal_score(tiny_llama, prompts)
    ids = tiny_llama.tokenizer(tiny_llama.render_prompt(prompts[1]), add_special_tokens=False)
    with torch.no_grad():
        logits = tiny_llama.hf(torch.tensor([ids["input_ids"]])).logits[0, -1].double()
    p = torch.softmax(logits, -1)[refusal_tokens(tiny_llama)].sum()
    assert scores[1] == pytest.approx(float(torch.log(p / (1 - p))), abs=1e-4)


def test_kl_is_zero_without_change_and_grows_with_steering(tiny_llama: acteng.Model) -> None:
    prompts = ["Tell me a joke.", "Hi"]
    vector = random_vector(tiny_llama, [1])
    zero = next_token_kl(tiny_llama, prompts, SteeringSpec(vector, coefficient=0.0))
    assert zero == pytest.approx([0.0, 0.0], abs=1e-6)
    weak = next_token_kl(tiny_llama, prompts, SteeringSpec(vector, coefficient=1.0))
    strong = next_token_kl(tiny_llama, prompts, SteeringSpec(vector, coefficient=8.0))
    assert all(0 < w < s for w, s in zip(weak, strong, strict=True))
