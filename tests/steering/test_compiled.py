"""The compiled decoding path: steering traced into a torch.compile'd static-cache step.

On CPU, torch.compile runs with the "eager" backend here: dynamo traces (and guards)
exactly as on a GPU, which is what recompilation depends on, without inductor's minutes
of code generation. Equality is checked against the eager hook path on the real model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import acteng
from acteng.errors import ConfigError
from acteng.generation import generate_ids
from acteng.steering import compiled as compiled_path
from acteng.steering.spec import SteeringSpec
from tests.helpers import FAMILY_CONFIGS, TINY, random_vector, spread_weights

PROMPTS = ["Tell me about your weekend.", "What is the capital of France? Answer briefly."]


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.fixture
def real(smollm2: acteng.Model) -> Iterator[acteng.Model]:
    compiled_path.for_model(smollm2, backend="eager", max_batch=4)
    yield smollm2
    compiled_path.release(smollm2)  # the session's model goes back to plain hooks


@pytest.fixture
def tiny(tokenizer: Any) -> Iterator[acteng.Model]:
    """A tiny Llama of this module's own (the shared ones must not keep our hooks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    kwargs = {**TINY, **FAMILY_CONFIGS["llama"], "vocab_size": len(tokenizer)}
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kwargs)).eval()
    spread_weights(hf)
    model = acteng.Model(hf, tokenizer, name="tiny-llama-compiled")
    compiled_path.for_model(model, backend="eager", max_batch=4)
    yield model
    compiled_path.release(model)


@pytest.mark.parametrize(
    "setting",
    [
        {"coefficient": 4.0},
        {"coefficient": -4.0},
        {"coefficient": 6.0, "positions": "generated"},
        {"coefficient": 1.0, "mode": "ablate"},
        {"coefficient": 3.0, "mode": "clamp"},
    ],
    ids=["add+", "add-", "generated", "ablate", "clamp"],
)
def test_compiled_path_equals_eager_hooks_on_the_real_model(
    real: acteng.Model, setting: dict[str, Any]
) -> None:
    if setting.get("mode") == "ablate":
        vector = _mean_activation(real, [4, 8, 12])  # a direction the model really uses
    else:
        vector = random_vector(real, [4, 8, 12], seed=1, scale=2.0)
    kwargs: dict[str, Any] = {"max_new_tokens": 10, **setting}
    eager = acteng.generate(real, PROMPTS, vector, compiled=False, **kwargs)
    fast = acteng.generate(real, PROMPTS, vector, compiled=True, **kwargs)
    plain = acteng.generate(real, PROMPTS, compiled=False, max_new_tokens=10)
    assert fast == eager
    assert fast != plain  # the steering did something


def _mean_activation(model: acteng.Model, layers: list[int]) -> acteng.SteeringVector:
    ids = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        states = model.hf(**ids, output_hidden_states=True).hidden_states
    return acteng.SteeringVector(
        {layer: states[layer + 1].mean(dim=(0, 1)).float() for layer in layers},
        {"model": model.identity(), "method": "mean activation"},
    )


def test_unsteered_compiled_generation_equals_plain(real: acteng.Model) -> None:
    assert acteng.generate(real, PROMPTS, compiled=True, max_new_tokens=10) == acteng.generate(
        real, PROMPTS, compiled=False, max_new_tokens=10
    )


def test_changing_steering_never_recompiles(tiny: acteng.Model) -> None:
    path = compiled_path.for_model(tiny)
    ids = tiny.tokenizer(["hello there", "a b c d e f"], return_tensors="pt", padding=True)
    ids = {k: v for k, v in ids.items()}
    one = random_vector(tiny, [0, 1, 2, 3], seed=1)
    two = random_vector(tiny, [1, 3], seed=2)

    def run(rows: list[list[SteeringSpec]], prompt: dict[str, torch.Tensor] = ids) -> torch.Tensor:
        return path.generate_ids(prompt, rows, max_new_tokens=6, do_sample=False)

    torch._dynamo.reset()
    counters.clear()
    # One graph per step shape (terms per layer, projection or not), compiled once each.
    run([[], []])  # nothing steered: the plain graph
    run([[SteeringSpec(one, 2.0)], []])  # one add term per layer
    run([[SteeringSpec(two, 1.0, mode="ablate")], []])  # one term, the full formula
    run([[SteeringSpec(one, 1.0), SteeringSpec(two, 1.0, positions="0:2")], []])  # two, full
    warm = _graphs()
    assert warm >= 4
    outputs = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (
            [[SteeringSpec(one, -3.0)], [SteeringSpec(one, -3.0)]],
            [[], [SteeringSpec(two, 5.0, layers=(3,))]],
            [[SteeringSpec(one, 7.0, positions="generated")], [SteeringSpec(two, 0.5)]],
            [[SteeringSpec(two, 1.0, mode="ablate")], [SteeringSpec(one, 0.5, mode="clamp")]],
            [[SteeringSpec(one, 2.0, positions="0:3"), SteeringSpec(two, -1.0)], []],
            [[], []],
        ):
            outputs.append(run(rows))
        # a prompt of another length fits the same cache bucket: no new graph either
        short = tiny.tokenizer(["hi", "yo"], return_tensors="pt", padding=True)
        run([[SteeringSpec(one, 1.0)], []], dict(short))
    assert _graphs() == warm
    assert not outputs[0].equal(outputs[-1])  # the steering did change the text


def test_rows_are_steered_independently(tiny: acteng.Model) -> None:
    """Row i of a mixed batch equals the same prompt steered alone (eager hooks)."""
    path = compiled_path.for_model(tiny)
    vector = random_vector(tiny, [1, 2], seed=3, scale=3.0)
    prompts = ["one two three", "four five six"]
    batch = dict(tiny.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left"))
    mixed = path.generate_ids(
        batch, [[SteeringSpec(vector, 4.0)], []], max_new_tokens=5, do_sample=False
    )[:, -5:]
    for i, spec in enumerate([SteeringSpec(vector, 4.0), None]):
        alone = generate_ids(tiny, [prompts[i]], spec, chat=False, max_new_tokens=5, compiled=False)
        assert mixed[i].tolist() == alone[0]


def test_batches_larger_than_max_batch_are_split(real: acteng.Model) -> None:
    prompts = [f"Name a colour, number {i}." for i in range(5)]  # max_batch is 4
    vector = random_vector(real, [8], seed=4, scale=2.0)
    fast = acteng.generate(real, prompts, vector, coefficient=3.0, max_new_tokens=6, compiled=True)
    eager = acteng.generate(
        real, prompts, vector, coefficient=3.0, max_new_tokens=6, compiled=False
    )
    assert fast == eager


def test_bad_uses_are_clear_errors(real: acteng.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="eager path"):
        generate_ids(real, "hi", compiled=True, contexts=[torch.no_grad()])
    path = compiled_path.for_model(real)
    with pytest.raises(ConfigError, match="max_batch"):
        path.set_rows([[]] * 5, [3] * 5)
    monkeypatch.setenv("ACTENG_COMPILE", "1")
    assert compiled_path.wants_compiled(real)
    monkeypatch.setenv("ACTENG_COMPILE", "0")
    assert not compiled_path.wants_compiled(real)
    monkeypatch.delenv("ACTENG_COMPILE")
    assert not compiled_path.wants_compiled(real)  # CPU float32: eager by default


def test_attached_hooks_leave_other_forward_passes_alone(make_tiny: Any) -> None:
    """With the compiled path attached and nothing steered, any forward is the plain one,
    also for a family whose blocks get no position_ids (GPT-2)."""
    model = make_tiny("gpt2")
    ids = model.tokenizer(["a b c", "d e"], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model.hf(**ids).logits
        compiled_path.for_model(model, backend="eager")
        try:
            attached = model.hf(**ids).logits
        finally:
            compiled_path.release(model)
    assert torch.equal(plain, attached)
