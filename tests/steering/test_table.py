"""SteeringTable (per-row steering) and the slot engine on tiny models: parity with steer."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import acteng
from acteng.errors import ConfigError
from acteng.positions import parse_positions
from acteng.steering.table import SteeringTable
from tests.helpers import hook_count, random_vector

TEXT = "Tell me a story about a dragon who learns to fly."


def _logits(model: acteng.Model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(input_ids=ids).logits


@pytest.mark.parametrize(
    "kwargs",
    [
        {"coefficient": 3.0},
        {"coefficient": 0.8, "mode": "ablate"},
        {"coefficient": 2.0, "mode": "clamp"},
        {"coefficient": 3.0, "positions": "2:5"},
        {"coefficient": 3.0, "positions": "-3:"},
        {"coefficient": -2.0, "layers": (1,)},
    ],
)
def test_a_steered_row_equals_steer_and_others_are_untouched(
    tiny_llama: acteng.Model, kwargs: dict[str, Any]
) -> None:
    model = tiny_llama
    vector = random_vector(model, [1, 2], scale=0.5)
    spec = acteng.SteeringSpec(vector, **kwargs)
    ids = model.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    batch = ids.repeat(3, 1)
    plain = _logits(model, ids)[0]
    with acteng.steer(model, spec):
        expected = _logits(model, ids)[0]
    table = SteeringTable(model, slots=4)
    table.set(3, [spec], prompt_len=ids.shape[1])
    before = hook_count(model)
    with table.applied(model, torch.tensor([0, 3, 0])):
        got = _logits(model, batch)
    assert hook_count(model) == before
    torch.testing.assert_close(got[1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[1], plain, atol=1e-3)


def test_add_is_bitwise_what_steer_adds(tiny_llama: acteng.Model) -> None:
    vector = random_vector(tiny_llama, [2])
    ids = tiny_llama.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with acteng.steer(tiny_llama, vector, coefficient=4.0):
        expected = _logits(tiny_llama, ids)
    table = SteeringTable(tiny_llama, slots=2)
    table.set(1, [acteng.SteeringSpec(vector, 4.0)], prompt_len=ids.shape[1])
    with table.applied(tiny_llama, torch.tensor([1])):
        assert torch.equal(_logits(tiny_llama, ids), expected)


def test_several_specs_apply_in_order_and_rows_differ(tiny_llama: acteng.Model) -> None:
    v, w = random_vector(tiny_llama, [2], seed=1), random_vector(tiny_llama, [2], seed=2)
    specs = [acteng.SteeringSpec(v, 2.0), acteng.SteeringSpec(w, 1.0, mode="ablate")]
    ids = tiny_llama.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with acteng.steer(tiny_llama, specs):
        both = _logits(tiny_llama, ids)[0]
    with acteng.steer(tiny_llama, w, coefficient=-3.0):
        other = _logits(tiny_llama, ids)[0]
    table = SteeringTable(tiny_llama, slots=2)
    table.set(1, specs, prompt_len=ids.shape[1])
    table.set(2, [acteng.SteeringSpec(w, -3.0)], prompt_len=ids.shape[1])
    with table.applied(tiny_llama, torch.tensor([2, 1])):
        got = _logits(tiny_llama, ids.repeat(2, 1))
    torch.testing.assert_close(got[1], both, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], other, atol=1e-5, rtol=1e-5)


def test_table_limits_and_clearing(tiny_llama: acteng.Model) -> None:
    vector = random_vector(tiny_llama, [1])
    table = SteeringTable(tiny_llama, slots=2, terms=2)
    with pytest.raises(ConfigError, match="at most 2 per layer"):
        table.set(1, [acteng.SteeringSpec(vector)] * 3, prompt_len=4)
    with pytest.raises(ConfigError, match="out of range"):
        table.set(3, [acteng.SteeringSpec(vector)], prompt_len=4)
    table.set(1, [acteng.SteeringSpec(vector, 2.0)], prompt_len=4)
    assert not table.is_empty(1)
    table.clear(1)
    assert table.is_empty(1) and float(table.delta.abs().sum()) == 0.0
    assert table.block_fns(torch.tensor([1, 0])) == {}


def test_set_many_replaces_whole_slots_with_a_fixed_number_of_writes(
    tiny_llama: acteng.Model,
) -> None:
    """A batch rewrite equals setting each slot on a fresh table, and its device writes do
    not grow with the batch (a compiled path pays them on every call)."""
    n = tiny_llama.num_layers
    vectors = [random_vector(tiny_llama, list(range(n)), seed=s) for s in range(8)]

    def items(count: int, shift: int) -> list[tuple[int, list[acteng.SteeringSpec], int]]:
        out = []
        for slot in range(1, count + 1):
            v = vectors[(slot + shift) % len(vectors)]
            layers = tuple(range((slot + shift) % n, n))
            mode = ("add", "ablate", "clamp")[(slot + shift) % 3]
            specs = [acteng.SteeringSpec(v, 0.5 * slot, layers=layers, mode=mode)]
            if slot % 2:
                specs.append(acteng.SteeringSpec(vectors[0], -1.0, positions="2:"))
            out.append((slot, specs, 3 + slot))
        return out

    table = SteeringTable(tiny_llama, slots=8, terms=2)
    table.set_many(items(8, shift=0))
    table.set_many(items(8, shift=1))  # every slot's layers, terms and modes change
    table.set_many([(slot, [], 0) for slot in (7, 8)])  # two rows go unsteered
    fresh = SteeringTable(tiny_llama, slots=8, terms=2)
    for slot, specs, prompt_len in items(6, shift=1):
        fresh.set(slot, specs, prompt_len=prompt_len)
    for mine, expected in zip(table.buffers(), fresh.buffers(), strict=True):
        assert torch.equal(mine, expected)
    assert table.is_empty(7) and table.terms_in_use([7, 8]) == 0
    assert table.needs_full([1]) == fresh.needs_full([1])

    class Writes(torch.utils._python_dispatch.TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten.index_put_.default:
                Writes.count += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for count in (2, 8):
        Writes.count = 0
        with Writes():
            table.set_many(items(count, shift=2))
        counts.append(Writes.count)
    assert counts[0] == counts[1] == 12, counts


@pytest.mark.parametrize("text", ["all", "prompt", "generated", "2:5", "-2:", ":3", "-4:-1"])
def test_positions_bounds_match_mask(text: str) -> None:
    positions = parse_positions(text)
    index = torch.arange(12)[None]
    prompt_len = torch.tensor([7])
    lo, hi = positions.bounds(7)
    expected = positions.mask(index, prompt_len)[0]
    assert torch.equal((index[0] >= lo) & (index[0] < hi), expected)


# --- the slot engine on a tiny model ----------------------------------------------------
def _run(engine: Any, request: Any) -> list[Any]:
    done = threading.Event()
    events: list[Any] = []

    def sink(event: Any) -> None:
        events.append(event)
        if event.kind in ("done", "error"):
            done.set()

    engine.submit(request, sink)
    assert done.wait(120)
    return events


@pytest.mark.parametrize("fixed_batch", [True, False])
def test_engine_equals_generate_on_a_tiny_model(
    tiny_llama: acteng.Model, fixed_batch: bool
) -> None:
    from acteng.server.engine import Engine
    from acteng.server.requests import GenerationRequest

    vector = random_vector(tiny_llama, [1, 2], scale=0.3)
    spec = acteng.SteeringSpec(vector, 2.0, positions="generated")
    prompts = ["Hello there", "A much longer prompt about dragons and their caves"]
    engine = Engine(tiny_llama, slots=4, context=128, fixed_batch=fixed_batch)
    engine.start()
    try:
        for prompt in prompts:
            for steering in ((), (spec,)):
                ids = tiny_llama.tokenizer(
                    tiny_llama.render_prompt(prompt), add_special_tokens=False
                )
                request = GenerationRequest(
                    prompt_ids=list(ids["input_ids"]), max_tokens=12, steering=steering
                )
                events = _run(engine, request)
                text = "".join(e.text for e in events if e.kind == "token")
                [expected] = acteng.generate(
                    tiny_llama, prompt, list(steering) or None, max_new_tokens=12
                )
                assert text == expected
                assert events[-1].kind == "done"
    finally:
        engine.stop()
    assert tiny_llama.hf.config._attn_implementation != "acteng_slots"
