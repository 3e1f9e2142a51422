"""steer: exact logits, modes, positions under the KV cache, batching, no leaked hooks."""

from collections.abc import Callable

import numpy as np
import pytest
import torch

import acteng
from acteng.errors import ConfigError
from acteng.positions import parse_positions
from tests.helpers import FAMILIES, block_output_hook, hook_count, random_vector

PROMPTS = ["Tell me a story about a dragon.", "Hi", "What is the capital of France? Answer."]


def logits(model: acteng.Model, text: str) -> torch.Tensor:
    ids = model.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model.hf(**ids).logits[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_add_equals_adding_to_block_output(
    family: str, make_tiny: Callable[[str], acteng.Model]
) -> None:
    model = make_tiny(family)
    baseline = hook_count(model)  # transformers keeps hooks of its own for hidden states
    vector = random_vector(model, [1, 2], scale=0.5)
    text = PROMPTS[0]
    for layer in (1, 2):
        handle = model.blocks[layer].register_forward_hook(block_output_hook(vector[layer], 3.0))
        try:
            expected = logits(model, text)
        finally:
            handle.remove()
        with acteng.steer(model, vector, coefficient=3.0, layers=[layer]):
            got = logits(model, text)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert not torch.allclose(got, logits(model, text), atol=1e-3)
    assert hook_count(model) == baseline


def test_modes(tiny_llama: acteng.Model) -> None:
    vector = random_vector(tiny_llama, [2])
    unit = vector[2] / vector[2].norm()
    seen: list[torch.Tensor] = []
    probe = tiny_llama.blocks[3].register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    try:
        with acteng.steer(tiny_llama, vector, mode="ablate"):
            logits(tiny_llama, PROMPTS[0])
        assert (seen[-1] @ unit).abs().max() < 1e-4
        with acteng.steer(tiny_llama, vector, mode="clamp", coefficient=2.5):
            logits(tiny_llama, PROMPTS[0])
        torch.testing.assert_close(
            seen[-1] @ unit,
            torch.full(seen[-1].shape[:2], 2.5 * float(vector[2].norm())),
            atol=1e-4,
            rtol=1e-5,
        )
    finally:
        probe.remove()


def test_several_vectors_at_once(tiny_llama: acteng.Model) -> None:
    v, w = random_vector(tiny_llama, [1], seed=1), random_vector(tiny_llama, [1], seed=2)
    combined = 2.0 * v + (-1.0) * w
    with acteng.steer(tiny_llama, combined, coefficient=1.0):
        expected = logits(tiny_llama, PROMPTS[0])
    specs = [acteng.SteeringSpec(v, 2.0), acteng.SteeringSpec(w, -1.0)]
    with acteng.steer(tiny_llama, specs):
        got = logits(tiny_llama, PROMPTS[0])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_bad_steering_and_prompts_are_clear_errors(tiny_llama: acteng.Model) -> None:
    vector = random_vector(tiny_llama, [1])
    huge = acteng.SteeringVector({1: vector[1] * 1e30}, dict(vector.metadata))
    with pytest.raises(ConfigError, match="norms out of range"):
        acteng.generate(tiny_llama, "Hi", huge, coefficient=1.0, max_new_tokens=2)
    with pytest.raises(ConfigError, match="got Tensor; wrap a raw direction"):
        acteng.generate(tiny_llama, "Hi", vector[1], max_new_tokens=2)  # type: ignore[arg-type]
    for prompts, message in (
        (None, "got NoneType"),
        ([1, 2], "prompt 0 must be a text or a list of messages"),
        ([[{"content": "hi"}]], "prompt 0 must be a text or a list of messages"),
    ):
        with pytest.raises(ConfigError, match=message):
            acteng.generate(tiny_llama, prompts, max_new_tokens=2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="whole number"):
        acteng.generate(tiny_llama, "Hi", max_new_tokens=2.5)  # type: ignore[arg-type]
    # one conversation is one prompt; any iterable of prompts and numpy integers work
    conversation = [{"role": "user", "content": "Hi"}]
    assert len(acteng.generate(tiny_llama, conversation, max_new_tokens=2)) == 1
    prompts = (p for p in ("Hi", "Hello"))
    assert len(acteng.generate(tiny_llama, prompts, max_new_tokens=np.int64(2))) == 2


def test_steering_marks_do_not_pile_up(tiny_llama: acteng.Model) -> None:
    from acteng.hooks import _STEERING_HOOKS

    vector = random_vector(tiny_llama, [1])
    for _ in range(5):  # the server's eager path steers every decoding step
        with acteng.steer(tiny_llama, vector, coefficient=1.0, layers=[1]):
            pass
    with acteng.steer(tiny_llama, vector, coefficient=1.0, layers=[1]):
        assert len(_STEERING_HOOKS[tiny_llama.blocks[1]]) == 1


def test_no_hook_left_after_exit_or_error(tiny_llama: acteng.Model) -> None:
    vector = random_vector(tiny_llama, [0, 1, 2, 3])
    baseline = hook_count(tiny_llama)
    before = logits(tiny_llama, PROMPTS[1])
    with (
        pytest.raises(RuntimeError, match="boom"),
        acteng.steer(tiny_llama, vector, coefficient=5.0, positions="generated"),
    ):
        assert hook_count(tiny_llama) == baseline + 5  # 4 blocks + the position tracker
        raise RuntimeError("boom")
    assert hook_count(tiny_llama) == baseline
    torch.testing.assert_close(logits(tiny_llama, PROMPTS[1]), before)
    handle = acteng.apply_steering(tiny_llama, vector, coefficient=5.0)
    assert handle.active
    handle.remove()
    assert hook_count(tiny_llama) == baseline and not handle.active


def reference_greedy(
    model: acteng.Model,
    prompt: str,
    vector: acteng.SteeringVector,
    layer: int,
    coefficient: float,
    positions: str,
    steps: int,
) -> list[int]:
    """Greedy decoding without a KV cache, steering chosen absolute positions by hand."""
    ids = model.tokenizer(model.render_prompt(prompt), add_special_tokens=False)["input_ids"]
    plen = len(ids)
    spec = parse_positions(positions)
    out: list[int] = []
    for _ in range(steps):
        index = torch.arange(len(ids))[None]
        keep = spec.mask(index, torch.tensor([plen]))[0]
        hook = block_output_hook(
            vector[layer], coefficient, keep=lambda p, keep=keep: bool(keep[p])
        )
        handle = model.blocks[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                logit = model.hf(torch.tensor([ids]), use_cache=False).logits[0, -1]
        finally:
            handle.remove()
        token = int(logit.argmax())
        out.append(token)
        ids = [*ids, token]
    return out


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "-2:", "0:3", ":-1"])
def test_positions_with_kv_cache_match_recomputation(
    tiny_llama: acteng.Model, positions: str
) -> None:
    vector = random_vector(tiny_llama, [1], scale=2.0)
    steps = 6
    expected = reference_greedy(tiny_llama, PROMPTS[0], vector, 1, 4.0, positions, steps)
    text = acteng.generate(
        tiny_llama,
        PROMPTS[0],
        vector,
        coefficient=4.0,
        layers=[1],
        positions=positions,
        max_new_tokens=steps,
    )[0]
    got = tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_llama.tokenizer.decode(expected, skip_special_tokens=True) == text, got


@pytest.mark.parametrize("positions", ["all", "generated", "-1:"])
def test_left_padded_batch_equals_one_by_one(tiny_gemma3: acteng.Model, positions: str) -> None:
    vector = random_vector(tiny_gemma3, [1, 2], scale=2.0)
    batched = acteng.generate(
        tiny_gemma3, PROMPTS, vector, coefficient=3.0, positions=positions, max_new_tokens=8
    )
    single = [
        acteng.generate(
            tiny_gemma3, p, vector, coefficient=3.0, positions=positions, max_new_tokens=8
        )[0]
        for p in PROMPTS
    ]
    assert batched == single


def test_spec_validation(tiny_llama: acteng.Model, smollm2: acteng.Model) -> None:
    vector = random_vector(tiny_llama, [1])
    baseline = hook_count(smollm2)
    for bad in (float("nan"), float("inf"), 1e9):
        with pytest.raises(ConfigError, match="coefficient"):
            acteng.SteeringSpec(vector, bad)
    with pytest.raises(ConfigError, match="must be a number"):
        acteng.SteeringSpec(vector, "4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"layer\(s\) \[2\] are not in the vector"):
        acteng.SteeringSpec(vector, 1.0, layers=(2,))
    with pytest.raises(ConfigError, match="unknown mode 'scale'"):
        acteng.SteeringSpec(vector, 1.0, mode="scale")
    with pytest.raises(ConfigError, match="unknown positions"):
        acteng.SteeringSpec(vector, 1.0, positions="middle")  # type: ignore[arg-type]
    with (
        pytest.raises(acteng.ActengError, match="width 64 != model width 576"),
        acteng.steer(smollm2, vector),
    ):
        pass
    assert hook_count(smollm2) == baseline


def test_layers_validation_and_number_types(tiny_llama: acteng.Model) -> None:
    import numpy as np

    vector = random_vector(tiny_llama, [1, 2])
    with pytest.raises(ConfigError, match="repeat a layer"):
        acteng.SteeringSpec(vector, 2.0, layers=(1, 1))
    with pytest.raises(ConfigError, match="non-empty list"):
        acteng.SteeringSpec(vector, 2.0, layers=())
    assert acteng.SteeringSpec(vector, 2.0, layers=1).layers == (1,)  # type: ignore[arg-type]
    assert acteng.SteeringSpec(vector, np.float32(2.0)).coefficient == 2.0  # type: ignore[arg-type]


def test_chunked_prompt_and_cache_reuse_count_as_prompt(tiny_llama: acteng.Model) -> None:
    """Multi-token calls on a warm cache extend the prompt; single tokens are generated."""
    from transformers import DynamicCache

    vector = random_vector(tiny_llama, [1], scale=2.0)
    ids = tiny_llama.tokenizer(
        "one two three four five six seven eight nine ten", return_tensors="pt"
    )["input_ids"]
    n = ids.shape[1]
    hook = block_output_hook(vector[1], 3.0, keep=lambda p: p < n - 1)
    handle = tiny_llama.blocks[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            expected = tiny_llama.hf(ids).logits[0, -1]
    finally:
        handle.remove()
    cache = DynamicCache(config=tiny_llama.hf.config)
    with acteng.steer(tiny_llama, vector, coefficient=3.0, positions="prompt"), torch.no_grad():
        tiny_llama.hf(ids[:, :4], cache=cache, use_cache=True)  # first chunk
        tiny_llama.hf(ids[:, 4 : n - 1], cache=cache, use_cache=True)  # second chunk
        got = tiny_llama.hf(ids[:, n - 1 :], cache=cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_positions_need_the_top_level_model(tiny_llama: acteng.Model) -> None:
    vector = random_vector(tiny_llama, [1])
    ids = tiny_llama.tokenizer("hello there", return_tensors="pt")
    with (
        pytest.raises(ConfigError, match=r"through model\.hf"),
        acteng.steer(tiny_llama, vector, positions="prompt"),
        torch.no_grad(),
    ):
        tiny_llama.hf.model(**ids)


def test_static_cache_left_padding_windows(tiny_llama: acteng.Model) -> None:
    """With a static cache the model sees a 4-D mask; positions come from position ids."""
    vector = random_vector(tiny_llama, [1], scale=2.0)
    prompts = ["hello world how are you doing today my friend", "hi"]
    tok = tiny_llama.tokenizer

    def run(texts: list[str]) -> list[list[int]]:
        batch = tok(texts, return_tensors="pt", padding=True, padding_side="left")
        with acteng.steer(tiny_llama, vector, coefficient=4.0, positions="0:2"):
            out = tiny_llama.hf.generate(
                **batch,
                max_new_tokens=4,
                do_sample=False,
                cache_implementation="static",
                pad_token_id=tok.pad_token_id,
            )
        return out[:, batch["input_ids"].shape[1] :].tolist()

    assert run(prompts) == run(prompts[:1]) + run(prompts[1:])
