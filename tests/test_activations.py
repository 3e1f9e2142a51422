"""record_activations and record_token_matrix: equal hidden_states[i + 1], batching and
reading positions."""

from collections.abc import Callable

import pytest
import torch

import acteng
from acteng.activations import ReadItem, pair_items, record_token_matrix, record_tokens
from acteng.errors import ConfigError, InputTooLongError
from acteng.layer_selection import parse_layers
from acteng.methods import fit_logistic

TEXTS = ["The cat sat on the mat.", "Hi", "A much longer sentence about the weather in spring."]


def reference(model: acteng.Model, text: str, layer: int) -> torch.Tensor:
    ids = model.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.hf(**ids, output_hidden_states=True)
    return out.hidden_states[layer + 1][0]  # [pos, d]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_last_and_mean_equal_hidden_states(
    family: str, make_tiny: Callable[[str], acteng.Model]
) -> None:
    model = make_tiny(family)
    layers = [0, 1, 2]  # hidden_states[L] is normed by transformers, so stop before it
    last = acteng.record_activations(model, TEXTS, layers, "last", batch_size=2)
    mean = acteng.record_activations(model, TEXTS, layers, "mean", batch_size=2)
    for i, text in enumerate(TEXTS):
        for layer in layers:
            ref = reference(model, text, layer)
            torch.testing.assert_close(last.rows[layer][i], ref[-1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mean.rows[layer][i], ref.mean(0), atol=1e-5, rtol=1e-4)


def test_batched_equals_one_by_one(tiny_llama: acteng.Model) -> None:
    batched = acteng.record_activations(tiny_llama, TEXTS, "all", "mean", batch_size=8)
    for i, text in enumerate(TEXTS):
        single = acteng.record_activations(tiny_llama, [text], "all", "mean")
        for layer in batched.layers:
            torch.testing.assert_close(
                batched.rows[layer][i], single.rows[layer][0], atol=1e-5, rtol=1e-4
            )


def test_token_matrix_packs_every_texts_tokens(tiny_llama: acteng.Model) -> None:
    """record_token_matrix: each text's tokens in input order, layers side by side, equal
    to hidden_states; record_tokens is the same rows per text."""
    layers = [2, 0]
    tokens, offsets = record_token_matrix(tiny_llama, TEXTS, layers, batch_size=2)
    per_text = record_tokens(tiny_llama, TEXTS, layers, batch_size=2)
    d = tiny_llama.hidden_size
    assert offsets[0] == 0 and offsets[-1] == len(tokens) and len(offsets) == len(TEXTS) + 1
    assert tokens.shape == (len(tokens), len(layers) * d) and tokens.dtype == torch.float32
    for i, text in enumerate(TEXTS):
        rows = tokens[offsets[i] : offsets[i + 1]]
        assert torch.equal(per_text[i].flatten(1), rows)
        for k, layer in enumerate(layers):
            ref = reference(tiny_llama, text, layer)
            assert len(rows) == len(ref)
            torch.testing.assert_close(rows[:, k * d : (k + 1) * d], ref, atol=1e-5, rtol=1e-4)


def test_fit_logistic_overwrite_gives_the_same_probe() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen) * torch.tensor([1.0, 10.0, 0.1, 1.0, 3.0, 1.0])
    y = (x[:, 0] + 0.1 * x[:, 1] > 0).float()
    copy = x.clone()
    kept = fit_logistic(x, y, l2=1.0, steps=50)
    assert torch.equal(x, copy)  # the default leaves x alone
    overwritten = fit_logistic(copy, y, l2=1.0, steps=50, overwrite=True)
    assert torch.equal(kept[0], overwritten[0]) and kept[1] == overwritten[1]


def test_completion_mean_and_answer_positions(tiny_llama: acteng.Model) -> None:
    pairs = acteng.load_pairs(
        [{"prompt": "Pick one.\n (A) x\n (B) y", "positive": "(A)", "negative": "(B)"}]
    )
    positives, _ = pair_items(tiny_llama, pairs)
    item = positives[0]
    assert item.rendered and item.text.endswith("(A)")
    ids = tiny_llama.tokenizer(item.text, add_special_tokens=False, return_offsets_mapping=True)
    tokens = [item.text[a:b] for a, b in ids["offset_mapping"]]
    answer = acteng.record_activations(tiny_llama, [item], [1], "answer")
    with torch.no_grad():
        hs = tiny_llama.hf(torch.tensor([ids["input_ids"]]), output_hidden_states=True)
    where = next(i for i, t in enumerate(tokens) if "A" in t and i > len(tokens) - 4)
    torch.testing.assert_close(
        answer.rows[1][0], hs.hidden_states[2][0, where], atol=1e-5, rtol=1e-4
    )


def test_layers_parsing(tiny_llama: acteng.Model) -> None:
    assert parse_layers(tiny_llama, "1-2") == [1, 2]
    assert parse_layers(tiny_llama, "0,3") == [0, 3]
    assert parse_layers(tiny_llama, -1) == [3]
    assert parse_layers(tiny_llama, "2-") == [2, 3]
    with pytest.raises(ConfigError, match=r"layer\(s\) \[7\] out of range.*0-3"):
        parse_layers(tiny_llama, [7])
    with pytest.raises(ConfigError, match="cannot read layers"):
        parse_layers(tiny_llama, "one")


def test_bad_inputs(tiny_llama: acteng.Model) -> None:
    with pytest.raises(ConfigError, match="empty"):
        acteng.record_activations(tiny_llama, ["ok", ""], [0])
    with pytest.raises(ConfigError, match="no texts"):
        acteng.record_activations(tiny_llama, [], [0])
    with pytest.raises(ConfigError, match="unknown read position"):
        acteng.record_activations(tiny_llama, ["x"], [0], "first")
    with pytest.raises(InputTooLongError, match="more than the model's context of 512"):
        acteng.record_activations(tiny_llama, [ReadItem("word " * 600)], [0])


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "qwen3"])
@pytest.mark.parametrize("position", ["last", "mean", "answer"])
def test_prefix_sharing_is_exact(
    family: str, position: str, make_tiny: Callable[[str], acteng.Model]
) -> None:
    model = make_tiny(family)
    pairs = [*acteng.load_pairs("sentiment")[:5], *acteng.load_pairs("myopia")[:3]]
    positives, negatives = pair_items(model, pairs)
    texts = positives + negatives
    shared = acteng.record_activations(model, texts, "all", position, batch_size=5)
    plain = acteng.record_activations(
        model, texts, "all", position, batch_size=5, share_prefix=False
    )
    for layer in shared.layers:
        torch.testing.assert_close(shared.rows[layer], plain.rows[layer], atol=1e-5, rtol=1e-4)


def test_long_texts_on_sliding_window_models_share_nothing(
    tiny_gemma3: acteng.Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the sliding window every text runs in full: no cached prefix of any kind."""
    import acteng.activations as activations

    seen: list[list[int]] = []
    real_plan = activations.plan_batches

    def spy(token_ids, shareable, read_starts, batch_size):  # type: ignore[no-untyped-def]
        global_ids, plans = real_plan(token_ids, shareable, read_starts, batch_size)
        seen.append(global_ids)
        return global_ids, plans

    monkeypatch.setattr(activations, "plan_batches", spy)
    shared = "word " * 20  # 40 tokens: past the tiny model's window of 16
    texts = [shared + "one", shared + "two"]
    acts = acteng.record_activations(tiny_gemma3, texts, [1], "last")
    assert seen == [[]]
    plain = acteng.record_activations(tiny_gemma3, texts, [1], "last", share_prefix=False)
    torch.testing.assert_close(acts.rows[1], plain.rows[1])
