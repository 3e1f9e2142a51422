"""The slot attention on tiny sliding-window models (Gemma 2 and 3): parity with generate.

Each tiny model mixes sliding-window and full-attention layers with a window of 8 tokens,
so every prompt here runs past the window, during prefill and while decoding.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import acteng
from acteng.errors import UnsupportedError
from acteng.server.engine import Engine
from acteng.server.requests import GenerationRequest
from tests.helpers import FAMILY_CONFIGS, TINY, random_vector, spread_weights

WINDOW = 8
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
PROMPTS = [
    "Tell me a story about a dragon who learns to fly over the mountains.",
    "Hi",
    "Write three short lines about the sea, the wind and the gulls above them.",
]


@pytest.fixture(scope="module", params=["gemma3_text", "gemma2"])
def windowed(request: pytest.FixtureRequest, tokenizer: Any) -> acteng.Model:
    """A tiny random model of the family with a window of 8 and mixed layer types."""
    from transformers import AutoConfig, AutoModelForCausalLM

    family: str = request.param
    torch.manual_seed(0)
    kwargs = {
        **TINY,
        **FAMILY_CONFIGS[family],
        "vocab_size": len(tokenizer),
        "sliding_window": WINDOW,
        "layer_types": LAYER_TYPES,
    }
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs)).eval()
    spread_weights(hf)
    return acteng.Model(hf, tokenizer, name=f"tiny-{family}-window")


def _request(model: acteng.Model, prompt: str, steering: tuple[Any, ...] = ()) -> Any:
    ids = model.tokenizer(model.render_prompt(prompt), add_special_tokens=False)["input_ids"]
    assert len(ids) > WINDOW
    return GenerationRequest(prompt_ids=list(ids), max_tokens=12, steering=steering)


def _serve(engine: Engine, requests: list[Any]) -> list[str]:
    """Submit every request at once (so they decode together); their texts in order."""
    events: list[list[Any]] = [[] for _ in requests]
    done = [threading.Event() for _ in requests]

    def sink_for(i: int) -> Callable[[Any], None]:
        def sink(event: Any) -> None:
            events[i].append(event)
            if event.kind in ("done", "error"):
                done[i].set()

        return sink

    for i, request in enumerate(requests):
        engine.submit(request, sink_for(i))
    for flag in done:
        assert flag.wait(120)
    for got in events:
        assert got[-1].kind == "done", got[-1]
    return ["".join(e.text for e in got if e.kind == "token") for got in events]


def test_the_window_matters(windowed: acteng.Model) -> None:
    """The test models are sensitive to the window: the same weights without one differ."""
    ids = torch.tensor([_request(windowed, PROMPTS[0]).prompt_ids])
    config: Any = windowed.hf.config
    with torch.no_grad():
        windowed_logits = windowed.hf(input_ids=ids).logits[0, -1]
        config.sliding_window = 4096
        try:
            full_logits = windowed.hf(input_ids=ids).logits[0, -1]
        finally:
            config.sliding_window = WINDOW
    assert not torch.allclose(windowed_logits, full_logits, atol=1e-4)


@pytest.mark.parametrize("fixed_batch", [True, False])
def test_engine_equals_generate_past_the_window(windowed: acteng.Model, fixed_batch: bool) -> None:
    vector = random_vector(windowed, [1, 2], scale=0.3)
    spec = acteng.SteeringSpec(vector, 2.0)
    engine = Engine(windowed, slots=3, context=128, fixed_batch=fixed_batch)
    engine.start()
    try:
        for prompt in PROMPTS:
            for steering in ((), (spec,)):
                [text] = _serve(engine, [_request(windowed, prompt, steering)])
                [expected] = acteng.generate(
                    windowed, prompt, list(steering) or None, max_new_tokens=12
                )
                assert text == expected, (prompt, steering)
    finally:
        engine.stop()
    assert windowed.hf.config._attn_implementation != "acteng_slots"


def test_a_row_is_the_same_among_others(windowed: acteng.Model) -> None:
    """Batch invariance on sliding layers: each row equals its solo run, with other rows
    (steered or not, at other lengths) decoding beside it."""
    spec = acteng.SteeringSpec(random_vector(windowed, [1, 2], seed=1, scale=0.3), 3.0)
    requests = [
        _request(windowed, PROMPTS[0]),
        _request(windowed, PROMPTS[1], (spec,)),
        _request(windowed, PROMPTS[2]),
        _request(windowed, PROMPTS[0], (spec,)),
    ]
    engine = Engine(windowed, slots=4, context=128)
    engine.start()
    try:
        alone = [_serve(engine, [r])[0] for r in requests]
        engine.max_rows_seen = 0
        together = _serve(engine, requests)
        assert engine.max_rows_seen >= 2, "the requests were not batched together"
    finally:
        engine.stop()
    assert together == alone


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("layer_types", ["chunked_attention"] * 4, r"layer types \['chunked_attention'\]"),
        ("attn_logit_softcapping", 50.0, "soft-capping under sdpa"),
        ("use_bidirectional_attention", True, "bidirectional attention"),
    ],
)
def test_engine_refuses_what_it_cannot_compute(
    make_tiny: Callable[[str], acteng.Model],
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    value: Any,
    message: str,
) -> None:
    model = make_tiny("llama")
    monkeypatch.setattr(model.hf.config, setting, value, raising=False)
    with pytest.raises(UnsupportedError, match=message) as info:
        Engine(model, slots=2, context=64)
    assert "serves causal full and sliding-window attention" in str(info.value)


def test_compiled_step_honours_the_window(windowed: acteng.Model) -> None:
    """The compiled decoding step's masked attention keeps to the window too."""
    spec = acteng.SteeringSpec(random_vector(windowed, [1, 2], scale=0.3), 2.0)
    engine = Engine(
        windowed, slots=2, context=128, compiled=True, compile_options={"backend": "eager"}
    )
    engine.start()
    try:
        for steering in ((), (spec,)):
            [text] = _serve(engine, [_request(windowed, PROMPTS[0], steering)])
            [expected] = acteng.generate(
                windowed, PROMPTS[0], list(steering) or None, max_new_tokens=12
            )
            assert text == expected, steering
    finally:
        engine.stop()
