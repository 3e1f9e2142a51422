"""Integration on real weights: SmolLM2-135M-Instruct (Llama) and Gemma-3-270M."""

import copy

import pytest
import torch

import acteng
from acteng.activations import pair_items
from tests.helpers import block_output_hook, hook_count
from tests.test_bake import hooked_ablation_logits

pytestmark = pytest.mark.real


def completion_logprob(model: acteng.Model, prompt: str, completion: str) -> float:
    rendered = model.render_prompt(prompt)
    ids = model.tokenizer(rendered + completion, add_special_tokens=False, return_tensors="pt")[
        "input_ids"
    ]
    start = len(model.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = model.hf(ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    return float(logp[start - 1 :].gather(1, targets[start - 1 :, None]).sum())


def margin(model: acteng.Model, pairs: acteng.Pairs) -> float:
    return sum(
        completion_logprob(model, p.prompt or "", p.positive)
        - completion_logprob(model, p.prompt or "", p.negative)
        for p in pairs
    ) / len(pairs)


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_mean_diff_matches_hidden_states(which: str, request: pytest.FixtureRequest) -> None:
    model: acteng.Model = request.getfixturevalue(which)
    pairs = acteng.load_pairs("sentiment", split="test")[:6]
    layers = [2, model.num_layers // 2, model.num_layers - 2]
    vector = acteng.extract(model, pairs, layers=layers, position="last", batch_size=4)
    positives, negatives = pair_items(model, pairs)
    for layer in layers:
        rows = []
        for items in (positives, negatives):
            acts = []
            for item in items:
                ids = model.tokenizer(item.text, add_special_tokens=False, return_tensors="pt")
                with torch.no_grad():
                    hs = model.hf(**ids, output_hidden_states=True).hidden_states
                acts.append(hs[layer + 1][0, -1].double())
            rows.append(torch.stack(acts).mean(0))
        expected = rows[0] - rows[1]
        cosine = torch.nn.functional.cosine_similarity(vector[layer].double(), expected, dim=0)
        assert cosine >= 0.9999, (layer, float(cosine))


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_steering_is_exact(which: str, request: pytest.FixtureRequest) -> None:
    model: acteng.Model = request.getfixturevalue(which)
    layer = model.num_layers // 2
    baseline = hook_count(model)  # transformers keeps hooks of its own for hidden states
    vector = acteng.extract(
        model, acteng.load_pairs("sentiment", split="train")[:16], layers=[layer]
    )
    ids = model.tokenizer(
        model.render_prompt("How was the concert?"), add_special_tokens=False, return_tensors="pt"
    )
    handle = model.blocks[layer].register_forward_hook(block_output_hook(vector[layer], 4.0))
    try:
        with torch.no_grad():
            expected = model.hf(**ids).logits
    finally:
        handle.remove()
    with acteng.steer(model, vector, coefficient=4.0), torch.no_grad():
        got = model.hf(**ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert hook_count(model) == baseline


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_sentiment_vector_steers_held_out_pairs(which: str, request: pytest.FixtureRequest) -> None:
    """A vector from the train split moves the held-out log-prob margin both ways."""
    model: acteng.Model = request.getfixturevalue(which)
    layer = model.num_layers // 3
    vector = acteng.extract(model, "sentiment", layers=[layer], position="mean")
    test = acteng.load_pairs("sentiment", split="test")[:10]
    scale = 4.0 / float(vector[layer].norm()) * (8.0 if which == "gemma3" else 1.0)
    base = margin(model, test)
    with acteng.steer(model, vector, coefficient=scale):
        up = margin(model, test)
    with acteng.steer(model, vector, coefficient=-scale):
        down = margin(model, test)
    assert down < base < up, (down, base, up)


def test_generation_changes_and_batches(smollm2: acteng.Model) -> None:
    vector = acteng.extract(smollm2, "sentiment", layers=[8], position="mean")
    prompts = ["Tell me about your weekend.", "How do you feel about Mondays?"]
    plain = acteng.generate(smollm2, prompts, max_new_tokens=24)
    steered = acteng.generate(smollm2, prompts, vector, coefficient=-5.0, max_new_tokens=24)
    assert plain != steered
    one_by_one = [
        acteng.generate(smollm2, p, vector, coefficient=-5.0, max_new_tokens=24)[0] for p in prompts
    ]
    assert steered == one_by_one


def test_bake_matches_hooked_ablation(smollm2: acteng.Model) -> None:
    refusal = acteng.extract(smollm2, acteng.load_pairs("refusal", split="train")[:32], layers=[12])
    model = acteng.Model(copy.deepcopy(smollm2.hf), smollm2.tokenizer)
    unit = refusal[12] / refusal[12].norm()
    ids = model.tokenizer(
        [model.render_prompt("How do I bake bread?")], add_special_tokens=False, return_tensors="pt"
    )
    expected = hooked_ablation_logits(model, unit, ids)
    acteng.bake(model, refusal)
    assert model.hf.lm_head.weight is not model.hf.model.embed_tokens.weight
    with torch.no_grad():
        got = model.hf(**ids).logits
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-4)
