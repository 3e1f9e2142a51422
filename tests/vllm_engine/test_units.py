"""The vLLM engine's parts that need no vLLM: request parsing, cache salt, per-token slots.

These run in every environment; the tests that start vLLM are in test_vllm_*.py and are
skipped where vLLM is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from acteng.server.requests import RequestError
from acteng.vllm_engine.requests import ModelShape, parse_extra_args
from acteng.vllm_engine.worker import RunnerSteering
from tests.vllm_engine.support import HAVE_VLLM, PairLayer

SMOLLM2 = ModelShape("SmolLM2-135M-Instruct", num_layers=30, hidden_size=576)


def test_importing_acteng_never_imports_vllm() -> None:
    code = (
        "import sys, acteng, acteng.cli, acteng.cli.serve_cmd, acteng.vllm_engine, "
        "acteng.vllm_engine.requests, acteng.vllm_engine.worker; "
        "assert 'vllm' not in sys.modules, 'vllm was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
def test_missing_vllm_names_the_install_command() -> None:
    from acteng.errors import MissingExtraError
    from acteng.vllm_engine import require_vllm

    with pytest.raises(MissingExtraError, match=r"acteng\[vllm\].*scripts/setup-vllm"):
        require_vllm("acteng serve --engine vllm")


def test_steering_field_parses_like_the_server_and_salts_by_content() -> None:
    items = [{"vector": "honesty", "coefficient": 4}]
    parsed = parse_extra_args({"steering": items}, SMOLLM2)
    assert parsed is not None
    assert parsed.echo == [
        {"vector": "honesty", "coefficient": 4.0, "layers": [16], "positions": "all", "mode": "add"}
    ]
    same = parse_extra_args({"steering": json.dumps(items)}, SMOLLM2)  # vllm_xargs form
    assert same is not None and same.salt == parsed.salt
    other = parse_extra_args({"steering": [{"vector": "honesty", "coefficient": 5}]}, SMOLLM2)
    assert other is not None and other.salt != parsed.salt
    assert parse_extra_args(None, SMOLLM2) is None
    assert parse_extra_args({"steering": []}, SMOLLM2) is None
    with pytest.raises(RequestError, match="no vector or detector named 'ghost'"):
        parse_extra_args({"steering": [{"vector": "ghost"}]}, SMOLLM2)
    with pytest.raises(RequestError, match="out of range"):
        parse_extra_args({"steering": [{"vector": "honesty", "layers": [30]}]}, SMOLLM2)
    with pytest.raises(RequestError, match="not JSON"):
        parse_extra_args({"steering": "[{"}, SMOLLM2)


def _state(steering: list[dict[str, object]] | None, prompt_len: int) -> SimpleNamespace:
    extra = {"steering": steering} if steering else None
    return SimpleNamespace(
        sampling_params=SimpleNamespace(extra_args=extra), prompt_token_ids=[0] * prompt_len
    )


def test_tokens_point_at_their_request_slot_and_slots_come_back() -> None:
    steering = RunnerSteering(SMOLLM2, slots=4, max_tokens=32)
    requests = {
        "a": _state([{"vector": "honesty", "coefficient": 4}], 5),
        "b": _state(None, 3),
        "c": _state([{"vector": "honesty", "coefficient": 4}], 5),  # same as a: same slot
    }
    # a prefills 5 tokens, b 3, c 5 (query_start_loc [0, 5, 8, 13])
    steering.before_step(["a", "b", "c"], np.array([0, 5, 8, 13]), requests)
    slot = steering.slot_of["a"]
    assert slot > 0 and steering.slot_of["c"] == slot and steering.slot_of["b"] == 0
    expected = [slot] * 5 + [0] * 3 + [slot] * 5 + [0] * 19
    assert steering.token_slot.tolist() == expected
    # next step: one decode token each, a finished
    del requests["a"]
    steering.before_step(["c", "b"], np.array([0, 1, 2]), requests)
    assert steering.token_slot.tolist() == [slot] + [0] * 31
    del requests["c"]
    steering.before_step(["b"], np.array([0, 1]), requests)
    assert steering.token_slot.tolist() == [0] * 32
    assert steering.table.is_empty(slot)  # cleared once nobody uses it


def test_hook_adds_to_steered_tokens_only_and_ablates_on_the_stream() -> None:
    from acteng.bundled import bundled_files
    from acteng.vectors import SteeringVector

    shape = SMOLLM2
    steering = RunnerSteering(shape, slots=4, max_tokens=16)
    requests = {
        "add": _state([{"vector": "honesty", "coefficient": 3.0}], 2),
        "plain": _state(None, 2),
        "ablate": _state([{"vector": "refusal", "coefficient": 1.0, "mode": "ablate"}], 2),
    }
    steering.before_step(["add", "plain", "ablate"], np.array([0, 2, 4, 6]), requests)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, shape.hidden_size, generator=generator)
    residual = torch.randn(6, shape.hidden_size, generator=generator)
    positions = torch.tensor([0, 1, 0, 1, 0, 1])
    honesty = SteeringVector.load(bundled_files()["honesty"])[16]
    refusal = SteeringVector.load(bundled_files()["refusal"])[10]

    layers = [PairLayer() for _ in range(shape.num_layers)]
    steering.install(layers)
    assert len(steering.handles) == shape.num_layers

    def run(layer: int) -> torch.Tensor:
        out, res = layers[layer](positions, hidden, residual)
        assert res is residual
        return out + residual  # the residual stream after the block

    stream = hidden + residual
    at16 = run(16)
    torch.testing.assert_close(at16[:2], stream[:2] + 3.0 * honesty)
    assert torch.equal(run(16)[2:], stream[2:])  # unsteered and other-layer rows untouched
    at10 = run(10)
    unit = refusal / refusal.norm()
    torch.testing.assert_close((at10[4:] @ unit), torch.zeros(2), atol=1e-4, rtol=0)
    assert torch.equal(at10[:4], stream[:4])
    steering.remove()
    assert not steering.handles and all(not layer._forward_hooks for layer in layers)


def test_layer_hooks_go_through_hooks_py_and_never_leak() -> None:
    """Installing on layers of which one cannot be hooked leaves no hook behind, and
    installing again replaces the hooks instead of adding a second set."""
    steering = RunnerSteering(SMOLLM2, slots=2, max_tokens=8)
    layers: list[torch.nn.Module] = [PairLayer() for _ in range(SMOLLM2.num_layers)]
    broken = layers[:]
    broken[7] = object()  # type: ignore[assignment]
    with pytest.raises(AttributeError):
        steering.install(broken)
    assert all(not layer._forward_hooks for layer in layers)
    steering.install(layers)
    steering.install(layers)
    assert all(len(layer._forward_hooks) == 1 for layer in layers)
    steering.remove()
    assert all(not layer._forward_hooks for layer in layers)


def test_monitor_scores_are_the_readouts_filed_by_position() -> None:
    """The worker's per-token scores equal what acteng serve's `monitor` reads (`Readout`,
    the mean over the monitor's layers, standardised for a detector) on the steered
    stream, filed by request and token position."""
    from acteng.monitoring import Readout
    from acteng.vllm_engine.requests import resolver_for

    shape = SMOLLM2
    steering = RunnerSteering(shape, slots=4, max_tokens=16, monitors=4)
    items = [
        {"vector": "honesty"},
        {"vector": "harmful_request"},
        {"vector": "harmful_request", "layers": [10, 18]},
    ]
    monitored = _state([{"vector": "honesty", "coefficient": 3.0}], 4)
    monitored.sampling_params.extra_args["acteng_monitor"] = items
    requests = {"plain": _state(None, 2), "watched": monitored}
    # plain decodes one token at position 7; watched prefills its last 3 prompt tokens (1-3)
    steering.before_step(
        ["plain", "watched"], np.array([0, 1, 4]), requests, computed=np.array([7, 1])
    )
    assert steering.slot_of["watched"] > 0
    generator = torch.Generator().manual_seed(0)
    layers = [PairLayer() for _ in range(shape.num_layers)]
    steering.install(layers)
    positions = torch.tensor([7, 1, 2, 3])
    hidden = torch.randn(4, shape.hidden_size, generator=generator)
    residual = torch.randn(4, shape.hidden_size, generator=generator)
    streams = {}
    for layer in range(shape.num_layers):  # each block passes the stream on, steered
        out, residual = layers[layer](positions, hidden, residual)
        hidden = out
        streams[layer] = (hidden + residual)[1:]  # watched's tokens
    steering.after_step()
    steering.remove()

    resolver = resolver_for(shape)  # what acteng serve's `monitor` field reads
    expected = []
    for item in items:
        layers = item.get("layers")
        monitored = resolver.monitored(item["vector"], layers and tuple(layers), "monitor")
        readout = Readout(monitored.units, monitored.detector)
        per_layer = [readout.per_token(x, streams[x][None])[0] for x in readout.layers]
        expected.append(torch.stack(per_layer).mean(0))
    taken = steering.monitors.take(["watched", "plain"])  # type: ignore[union-attr]
    assert taken["plain"] == []
    [(position, rows)] = taken["watched"]
    assert position == 1 and len(rows) == 3 and len(rows[0]) == 3
    got = torch.tensor(rows, dtype=torch.float64)  # [token, column]
    torch.testing.assert_close(got, torch.stack(expected, 1), atol=1e-4, rtol=0)
    assert steering.monitors.take(["watched"]) == {"watched": []}  # type: ignore[union-attr]
