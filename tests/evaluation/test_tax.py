"""Tax and behaviour measures: exact on tiny models, sensible on the real one."""

from __future__ import annotations

import math

import pytest
import torch

import acteng
from acteng.errors import ConfigError, DataError
from acteng.evaluation.metrics import (
    BARE_PROMPT,
    ab_match,
    completion_logprobs,
    logprob_margin,
    pair_scores,
)
from acteng.evaluation.tax import (
    MCItem,
    distinct_n,
    load_eval,
    mc_accuracy,
    perplexity,
    repeated_ngrams,
)
from acteng.pairs import ContrastivePair
from acteng.steering.spec import SteeringSpec
from tests.evaluation.grid_data import bare_pairs
from tests.helpers import random_vector


def test_completion_logprobs_match_a_plain_forward(tiny_llama: acteng.Model) -> None:
    prompts, completions = ["Hi there", "A much longer question for the model?"], ["Yes.", "No"]
    got = completion_logprobs(tiny_llama, prompts, completions)
    tok = tiny_llama.tokenizer
    for (total, n), prompt, completion in zip(got, prompts, completions, strict=True):
        head = tok(tiny_llama.render_prompt(prompt), add_special_tokens=False)["input_ids"]
        tail = tok(completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = tiny_llama.hf(torch.tensor([head + tail])).logits[0].double()
        logprobs = torch.log_softmax(logits, -1)
        expected = sum(float(logprobs[len(head) - 1 + i, t]) for i, t in enumerate(tail))
        assert n == len(tail) and total == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ConfigError, match="2 prompts but 1"):
        completion_logprobs(tiny_llama, prompts, completions[:1])


@pytest.mark.real
def test_shared_prompts_score_like_full_passes(
    smollm2: acteng.Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pairs share their prompt and every chat text the template: computed once into a KV
    cache, they give the scores of full passes, steered on all positions or not."""
    from acteng.evaluation import metrics

    pairs = acteng.load_pairs("sentiment", split="test")[:6]
    vector = random_vector(smollm2, [4, 8], seed=3, scale=2.0)
    settings = [None, SteeringSpec(vector, 3.0), SteeringSpec(vector, 1.0, mode="ablate")]
    shared = [metrics.pair_scores(smollm2, pairs, s, batch_size=4) for s in settings]
    encoded = [([1, 2], [3])]
    assert metrics._can_share(smollm2, encoded, settings[1])
    windowed = SteeringSpec(vector, 3.0, positions="generated")
    assert not metrics._can_share(smollm2, encoded, windowed)  # needs token positions
    monkeypatch.setattr(metrics, "_can_share", lambda *_: False)
    for setting, got in zip(settings, shared, strict=True):
        full = metrics.pair_scores(smollm2, pairs, setting, batch_size=4)
        assert [x for row in got for x in row] == pytest.approx(
            [x for row in full for x in row], abs=5e-4
        )
    assert shared[0] != shared[1]  # the steering did change the scores


def test_ab_match_is_normalised(tiny_llama: acteng.Model) -> None:
    item = acteng.load_pairs("power_seeking")[0]
    flipped = type(item)(item.negative, item.positive, item.prompt, item.split, item.ab)
    [(p, mass)], [(q, _)] = ab_match(tiny_llama, [item]), ab_match(tiny_llama, [flipped])
    assert p + q == pytest.approx(1.0) and 0 < mass <= 1
    with pytest.raises(ConfigError, match="with a prompt"):
        ab_match(tiny_llama, acteng.load_pairs("harmful_requests")[:2])


def test_a_bare_pair_is_scored_as_the_answer_to_the_neutral_user_turn(
    tiny_llama: acteng.Model,
) -> None:
    bare = ContrastivePair("I love it.", "I hate it.")
    asked = ContrastivePair("I love it.", "I hate it.", prompt=BARE_PROMPT)
    spec = SteeringSpec(random_vector(tiny_llama, [1], scale=4.0), coefficient=1.0)
    for steering in (None, spec):
        [(pos, neg)] = pair_scores(tiny_llama, [bare], steering)
        (want_pos, _), (want_neg, _) = completion_logprobs(
            tiny_llama, [BARE_PROMPT] * 2, [bare.positive, bare.negative], steering
        )
        assert (pos, neg) == pytest.approx((want_pos, want_neg), abs=1e-9)
        assert pair_scores(tiny_llama, [asked], steering) == [(pos, neg)]
        assert logprob_margin(tiny_llama, [bare], steering) == [pos - neg]
    assert tiny_llama.render_prompt(BARE_PROMPT).endswith(
        "<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_perplexity_is_the_model_loss(tiny_llama: acteng.Model) -> None:
    text = "The river runs to the sea and the sea runs to the sky."
    ids = tiny_llama.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = float(tiny_llama.hf(ids, labels=ids).loss)
    assert perplexity(tiny_llama, [text]) == pytest.approx(math.exp(loss), rel=1e-4)
    # batching with padding changes nothing
    pooled = perplexity(tiny_llama, [text, "Short one.", text], batch_size=2)
    assert pooled == pytest.approx(perplexity(tiny_llama, [text, "Short one.", text], batch_size=1))


def test_fluency_measures() -> None:
    assert distinct_n(["a b c d"], 2) == 1.0
    assert distinct_n(["a b a b a b"], 2) == pytest.approx(2 / 5)
    assert repeated_ngrams(["the cat the cat the cat the cat"], 4) == pytest.approx(1 - 2 / 5)
    with pytest.raises(ConfigError):
        distinct_n(["a"], 0)


def test_bundled_eval_sets() -> None:
    texts = load_eval("neutral_text")
    items = load_eval("general_knowledge")
    assert len(texts) >= 50 and all(isinstance(t, str) and len(t.split()) > 40 for t in texts)
    assert len(items) >= 100 and all(isinstance(i, MCItem) for i in items)
    assert len(load_eval("general_knowledge", split="test")) == len(items) // 5
    with pytest.raises(ConfigError, match="no evaluation set"):
        load_eval("trivia")
    with pytest.raises(DataError, match="not a choice index"):
        MCItem("Q?", ("a", "b"), 2)


@pytest.mark.real
def test_tax_and_behaviour_on_the_real_model(smollm2: acteng.Model) -> None:
    texts = load_eval("neutral_text", split="test")
    items = load_eval("general_knowledge", split="test")
    base_ppl = perplexity(smollm2, texts)
    assert 2 < base_ppl < 60, base_ppl
    accuracy = mc_accuracy(smollm2, items)
    assert accuracy > 0.45, accuracy  # chance is 0.25
    noise = SteeringSpec(random_vector(smollm2, [8], scale=8.0), coefficient=1.0)
    assert perplexity(smollm2, texts, noise) > base_ppl * 1.2
    assert mc_accuracy(smollm2, items, noise) <= accuracy
    # a sentiment vector moves the margin of positive over negative answers both ways
    vector = acteng.extract(smollm2, "sentiment", layers=[8])
    test = acteng.load_pairs("sentiment", split="test")[:12]
    plus = logprob_margin(smollm2, test, SteeringSpec(vector, coefficient=4.0))
    base = logprob_margin(smollm2, test)
    minus = logprob_margin(smollm2, test, SteeringSpec(vector, coefficient=-4.0))
    assert sum(minus) < sum(base) < sum(plus)


@pytest.mark.real
def test_steering_toward_positive_raises_the_bare_margin(smollm2: acteng.Model) -> None:
    data = bare_pairs(acteng.load_pairs("sentiment"))
    vector = acteng.extract(smollm2, data.split("train")[:24], layers=[8])
    test = data.split("test")[:8]
    plus = logprob_margin(smollm2, test, SteeringSpec(vector, coefficient=4.0))
    base = logprob_margin(smollm2, test)
    minus = logprob_margin(smollm2, test, SteeringSpec(vector, coefficient=-4.0))
    assert sum(minus) < sum(base) < sum(plus)


@pytest.mark.real
def test_prompting_baseline_on_the_real_model(smollm2: acteng.Model) -> None:
    from acteng.evaluation.metrics import prompting_baseline

    vector = acteng.extract(smollm2, "sentiment", layers=[8])
    test = acteng.load_pairs("sentiment", split="test")[:12]
    instruction = "Always answer in a very positive, upbeat and enthusiastic tone."
    spec = SteeringSpec(vector, coefficient=4.0)
    result = prompting_baseline(smollm2, test, spec, instruction)
    assert set(result) == {"none", "steering", "prompt", "both"}
    assert result["none"] == pytest.approx(sum(logprob_margin(smollm2, test)) / len(test))
    assert (
        result["steering"] > result["none"]
    )  # the instruction need not help: measured, not assumed
    prompted = logprob_margin(smollm2, test, system=instruction)
    assert result["prompt"] == pytest.approx(sum(prompted) / len(prompted))
    with pytest.raises(ConfigError, match="non-empty instruction"):
        prompting_baseline(smollm2, test, spec, " ")
