"""Every mode gives the same outputs in every executor (float32, within 1e-5).

Executors: `steer` (eager hooks calling the mode's function); the steering table's eager
block functions; the compiled path (`CompiledSteering`, torch.compile with the "eager"
backend on CPU, which traces exactly as on a GPU); and the vLLM worker's hook on fake
residual-pair layers. Each decodes a two-row batch greedily (one row per slot, several
terms per layer, position windows over prompt and generated tokens) on a tiny Llama and
the per-step logits are compared. A mode registered here, and removed after, runs in all
four; a mode that cannot be applied per row is refused by all with one error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch

import acteng
from acteng.errors import ConfigError
from acteng.hooks import ForwardContext, hooked
from acteng.steering import compiled as compiled_path
from acteng.steering.modes import MODES, TableTerm, register_mode
from acteng.steering.spec import SteeringSpec
from acteng.steering.table import SteeringTable
from acteng.vllm_engine.requests import ModelShape
from acteng.vllm_engine.worker import RunnerSteering
from tests.helpers import random_vector
from tests.vllm_engine.support import PairLayer

PROMPT = "Tell me a story about a dragon."
NEW_TOKENS = 3
REGISTERED = "pull"  # registered by this module for its tests, removed after
Rows = list[list[SteeringSpec]]


def _pull(hidden: torch.Tensor, direction: torch.Tensor, coefficient: float) -> torch.Tensor:
    """A test mode using all three table numbers: x + c v + (|v| - x . v̂ / 2) v̂."""
    norm = direction.norm()
    unit = direction / norm
    along = (hidden @ unit).unsqueeze(-1)
    return hidden + coefficient * direction + (norm - 0.5 * along) * unit


def _pull_term(directions: torch.Tensor, norms: torch.Tensor, c: float) -> TableTerm:
    return TableTerm(delta=c * directions, a=norms, b=0.5)


@pytest.fixture(scope="module", autouse=True)
def registered_mode() -> Iterator[None]:
    register_mode(REGISTERED, term=_pull_term)(_pull)
    yield
    del MODES[REGISTERED]


@pytest.fixture(scope="module")
def model(make_tiny: Callable[[str], acteng.Model]) -> Iterator[acteng.Model]:
    """A copy of the tiny Llama (the shared one must not see our compiled hooks), with the
    compiled path's hooks attached."""
    shared = make_tiny("llama")
    tiny = acteng.Model(copy.deepcopy(shared.hf), shared.tokenizer, name="tiny-llama-contract")
    compiled_path.for_model(tiny, backend="eager", max_batch=2)
    yield tiny
    compiled_path.release(tiny)


def _rows(model: acteng.Model, mode: str, case: str) -> Rows:
    v = random_vector(model, [1, 2], seed=1, scale=0.5)
    w = random_vector(model, [1, 2], seed=2, scale=0.5)
    if case == "all":  # one term per layer; row 1 adds on one layer
        return [
            [SteeringSpec(v, 1.5, mode=mode)],
            [SteeringSpec(w, -1.5, layers=(2,))],
        ]
    # windows: two terms per layer, over prompt and generated tokens
    return [
        [
            SteeringSpec(v, 1.5, mode=mode, positions="1:4"),
            SteeringSpec(w, -0.7, mode=mode, positions="generated"),
        ],
        [
            SteeringSpec(w, 0.7, mode=mode, positions="prompt", layers=(2,)),
            SteeringSpec(v, 0.5, positions="-3:"),
        ],
    ]


def _generate(model: acteng.Model, run: Callable[..., Any] | None = None) -> torch.Tensor:
    """Greedy decoding of the two-row batch; the logits of every step [steps, rows, vocab]."""
    batch = dict(model.tokenizer([PROMPT, PROMPT], return_tensors="pt"))
    options: dict[str, Any] = {
        "max_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
        "pad_token_id": model.tokenizer.pad_token_id,
    }
    with torch.no_grad():
        out = run(batch, **options) if run else model.hf.generate(**batch, **options)
    return torch.stack(out.logits)


def _slot_items(model: acteng.Model, rows: Rows) -> list[tuple[int, list[SteeringSpec], int]]:
    """Row i in slot i + 1, for a prompt of the batch's length."""
    prompt_len = len(model.tokenizer(PROMPT)["input_ids"])
    return [(slot, specs, prompt_len) for slot, specs in enumerate(rows, start=1)]


def by_steer(model: acteng.Model, rows: Rows) -> torch.Tensor:
    with (
        acteng.steer(model, rows[0], rows=torch.tensor([True, False])),
        acteng.steer(model, rows[1], rows=torch.tensor([False, True])),
    ):
        return _generate(model)


def by_table(model: acteng.Model, rows: Rows) -> torch.Tensor:
    table = SteeringTable(model, slots=2, terms=2)
    table.set_many(_slot_items(model, rows))
    with table.applied(model, torch.tensor([1, 2])):
        return _generate(model)


def by_compiled(model: acteng.Model, rows: Rows) -> torch.Tensor:
    compiled = compiled_path.for_model(model)  # the one the fixture made
    return _generate(model, lambda batch, **kw: compiled.generate_ids(batch, rows, **kw))


def by_vllm_hook(model: acteng.Model, rows: Rows) -> torch.Tensor:
    """The worker's hooks on residual-pair layers, each block's output routed through one.

    The stream is split exactly into residual (its bfloat16 rounding) and hidden (the
    rest), so a hook that projected `hidden` alone instead of the sum would be caught.
    """
    shape = ModelShape(model.name, model.num_layers, model.hidden_size)
    runner = RunnerSteering(shape, slots=2, max_tokens=64, terms=2)
    runner.table.set_many(_slot_items(model, rows))
    layers = [PairLayer() for _ in range(model.num_layers)]
    runner.install(layers)

    def route(layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        batch, q, d = hidden.shape  # vLLM's flat batch: request 0's tokens, then request 1's
        assert ctx.token_index is not None
        runner.token_slot[: batch * q] = torch.arange(1, batch + 1).repeat_interleave(q)
        stream = hidden.reshape(batch * q, d)
        residual = stream.bfloat16().float()
        out, kept = layers[layer](ctx.token_index.reshape(-1), stream - residual, residual)
        return (out + kept).reshape(batch, q, d)

    fns = {layer: [route] for layer in range(model.num_layers)}
    try:
        with hooked(model.hf, model.blocks, fns, track_positions=True):
            return _generate(model)
    finally:
        runner.remove()


EXECUTORS = [by_table, by_compiled, by_vllm_hook]


@pytest.mark.parametrize("case", ["all", "windows"])
@pytest.mark.parametrize("mode", [*MODES, REGISTERED])
def test_every_executor_equals_steer(model: acteng.Model, mode: str, case: str) -> None:
    rows = _rows(model, mode, case)
    expected = by_steer(model, rows)
    assert not torch.allclose(expected, _generate(model), atol=1e-3)  # the steering acts
    for executor in EXECUTORS:
        got = executor(model, rows)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=executor.__name__)


def test_a_mode_without_a_table_term_is_refused_at_registration() -> None:
    with pytest.raises(ConfigError, match=r"'lonely' has no table term.*TableTerm"):
        register_mode("lonely")(_pull)
    assert "lonely" not in MODES


def _refusals(model: acteng.Model, rows: Sequence[list[SteeringSpec]]) -> list[str]:
    messages = []
    for executor in (by_steer, *EXECUTORS):
        with pytest.raises(ConfigError) as caught:
            executor(model, list(rows))
        messages.append(str(caught.value))
    return messages


def test_a_mode_put_in_modes_by_hand_is_refused_by_every_executor(model: acteng.Model) -> None:
    MODES["raw"] = _pull  # type: ignore[assignment]  # not through register_mode
    try:
        spec = SteeringSpec(random_vector(model, [1]), 1.0, mode="raw")
        messages = _refusals(model, [[spec], []])
    finally:
        del MODES["raw"]
    assert len(set(messages)) == 1, messages
    assert "'raw' was put in MODES without register_mode" in messages[0]


def test_a_term_of_the_wrong_shape_is_refused_before_any_write(model: acteng.Model) -> None:
    register_mode("crooked", term=lambda v, norms, c: TableTerm(delta=v[0]))(_pull)
    try:
        table = SteeringTable(model, slots=2)
        good = SteeringSpec(random_vector(model, [1, 2]), 2.0)
        table.set(1, [good], prompt_len=4)
        before = [buffer.clone() for buffer in table.buffers()]
        bad = SteeringSpec(random_vector(model, [1, 2]), 1.0, mode="crooked")
        with pytest.raises(ConfigError, match=r"'crooked'.*delta of shape \(64,\).*\(2, 64\)"):
            table.set(1, [bad], prompt_len=4)
    finally:
        del MODES["crooked"]
    assert all(torch.equal(a, b) for a, b in zip(table.buffers(), before, strict=True))
    assert table.terms_in_use([1]) == 1 and not table.is_empty(1)
