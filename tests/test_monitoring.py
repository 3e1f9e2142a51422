"""Per-token monitoring: scores equal projections of hidden states, during generation too."""

from contextlib import ExitStack

import pytest
import torch

import acteng
from acteng.errors import ConfigError
from acteng.monitoring import monitor, score_tokens
from tests.helpers import random_vector


def test_scores_are_projections_and_cosines(tiny_llama: acteng.Model) -> None:
    vector = random_vector(tiny_llama, [1, 2])
    texts = ["The cat sat on the mat.", "Hi there"]
    proj = score_tokens(tiny_llama, texts, vector, layers=[1, 2])
    cos = score_tokens(tiny_llama, texts, vector, layers=[1, 2], metric="cosine")
    for i, text in enumerate(texts):
        ids = tiny_llama.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hs = tiny_llama.hf(**ids, output_hidden_states=True).hidden_states
        assert proj[i].token_ids == ids["input_ids"][0].tolist()
        assert "".join(proj[i].tokens) == text
        for layer in (1, 2):
            h = hs[layer + 1][0]
            unit = vector[layer] / vector[layer].norm()
            torch.testing.assert_close(
                torch.tensor(proj[i].per_layer[layer]), h @ unit, atol=1e-5, rtol=1e-4
            )
            torch.testing.assert_close(
                torch.tensor(cos[i].per_layer[layer]),
                (h @ unit) / h.norm(dim=-1),
                atol=1e-5,
                rtol=1e-4,
            )
        agg = proj[i].aggregate
        assert agg[0] == pytest.approx((proj[i].per_layer[1][0] + proj[i].per_layer[2][0]) / 2)


def test_monitor_during_generation_matches_rescoring(tiny_llama: acteng.Model) -> None:
    vector = random_vector(tiny_llama, [1])
    tok = tiny_llama.tokenizer
    prompts = ["hello world how are you doing today", "hi"]
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with monitor(tiny_llama, vector, layers=[1]) as mon, torch.no_grad():
        out = tiny_llama.hf.generate(
            **batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id
        )
    for row in range(2):
        real = out[row][out[row] != tok.pad_token_id] if row == 1 else out[row]
        full = tok.decode(real)
        rescored = score_tokens(tiny_llama, full, vector, layers=[1])[0]
        got = mon.scores(row)[1]
        # the last generated token is never fed back, so it has no activation
        assert len(got) == len(real) - 1
        torch.testing.assert_close(
            torch.tensor(got), torch.tensor(rescored.per_layer[1][:-1]), atol=1e-4, rtol=1e-4
        )


def test_a_monitor_reads_after_steering_whichever_was_opened_first(
    tiny_llama: acteng.Model,
) -> None:
    vector = random_vector(tiny_llama, [1])
    ids = tiny_llama.tokenizer("hello world how are you", return_tensors="pt")

    def read(monitor_first: bool, steered: bool = True) -> list[float]:
        with ExitStack() as stack, torch.no_grad():
            if monitor_first:
                mon = stack.enter_context(monitor(tiny_llama, vector, layers=[1]))
            if steered:
                stack.enter_context(acteng.steer(tiny_llama, vector, coefficient=4.0, layers=[1]))
            if not monitor_first:
                mon = stack.enter_context(monitor(tiny_llama, vector, layers=[1]))
            tiny_llama.hf(**ids)
        return mon.scores()[1]

    inside, outside = read(monitor_first=False), read(monitor_first=True)
    assert inside == pytest.approx(outside)
    assert inside != pytest.approx(read(monitor_first=True, steered=False))


def test_a_huge_vector_reads_the_same_direction(tiny_llama: acteng.Model) -> None:
    # each element is finite but the float32 norm overflows; the direction is still clear
    vector = random_vector(tiny_llama, [1])
    huge = acteng.SteeringVector({1: vector[1] * 1e30}, dict(vector.metadata))
    [small], [big] = (score_tokens(tiny_llama, "hello there", v) for v in (vector, huge))
    assert big.aggregate == pytest.approx(small.aggregate, rel=1e-4, abs=1e-4)


def test_bad_requests(tiny_llama: acteng.Model) -> None:
    vector = random_vector(tiny_llama, [1])
    with pytest.raises(ConfigError, match="no layer"):
        score_tokens(tiny_llama, "x", vector, layers=[2])
    with pytest.raises(ConfigError, match="unknown metric"):
        score_tokens(tiny_llama, "x", vector, metric="dot")
    with pytest.raises(ConfigError, match="non-empty"):
        score_tokens(tiny_llama, [""], vector)
    detector = acteng.Detector(vector, offsets={1: 0.0}, scales={1: 1.0}, threshold=0.0)
    with pytest.raises(ConfigError, match="leave metric unset"):
        score_tokens(tiny_llama, "x", detector, metric="cosine")


@pytest.mark.real
def test_sentiment_vector_reads_sentiment(smollm2: acteng.Model) -> None:
    """On the real model, a sentiment vector scores held-out positive text above negative."""
    vector = acteng.extract(smollm2, "sentiment", layers=[8], position="mean")
    test = acteng.load_pairs("sentiment", split="test")
    pos = score_tokens(smollm2, [p.positive for p in test], vector)
    neg = score_tokens(smollm2, [p.negative for p in test], vector)
    wins = sum(
        sum(a.aggregate) / len(a.aggregate) > sum(b.aggregate) / len(b.aggregate)
        for a, b in zip(pos, neg, strict=True)
    )
    assert wins / len(test) >= 0.9, wins
