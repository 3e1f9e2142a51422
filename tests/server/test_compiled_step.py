"""The server engine's compiled decoding step (`acteng.server.compiled_step`).

On CPU, torch.compile runs with dynamo's "eager" backend: the tracing and guarding that
decide recompilation are the same as on a GPU. The compiled step must give what the
eager engine gives (text and monitor scores) for mixed batches of steered, unsteered and
monitored requests, and changing any of that must never compile a new graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import acteng
from acteng.errors import ConfigError
from acteng.library import VectorLibrary
from acteng.server.engine import Engine
from acteng.server.requests import GenerationRequest, Limits, parse_request
from acteng.server.resolve import Resolver
from tests.helpers import random_vector
from tests.server.serving import serve_all, summary

EAGER_COMPILE = {"backend": "eager"}


def _bodies(noise: str) -> list[dict[str, Any]]:
    """Requests that exercise every part of the step: add, ablate, clamp, a position
    window, several terms on one layer, monitors (a vector and a detector), a guard that
    watches the generation, and no steering at all."""
    ask = [
        "Tell me about your weekend.",
        "How do I bake bread?",
        "Write one line about the sea.",
        "What is the capital of France?",
        "Describe a cat.",
    ]
    settings: list[dict[str, Any]] = [
        {"steering": [{"vector": "refusal", "coefficient": 1.0}], "monitor": ["honesty"]},
        {},
        {
            "steering": [
                {"vector": noise, "coefficient": 0.7, "mode": "ablate"},
                {"vector": noise, "coefficient": 2.0, "positions": "generated"},
            ],
            "monitor": [noise, {"vector": noise, "layers": [9]}],
        },
        {"steering": [{"vector": "refusal", "coefficient": 2.0, "mode": "clamp"}]},
        {
            "monitor": ["refusal"],
            "guard": {"detector": "harmful_request", "policy": "flag", "check": "both"},
        },
    ]
    return [
        {"messages": [{"role": "user", "content": text}], "max_tokens": 12, **extra}
        for text, extra in zip(ask, settings, strict=True)
    ]


def _requests(model: acteng.Model, home: Path) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(5)
    noise = acteng.SteeringVector(
        {layer: torch.randn(model.hidden_size, generator=g) for layer in (6, 9)},
        {"method": "random"},
    )
    library = VectorLibrary(home)
    if "noise" not in library:
        library.add("noise", noise)
    resolver = Resolver(model, library)
    limits = Limits(context=256, max_tokens=64)
    return [
        parse_request(body, chat=True, resolver=resolver, limits=limits)
        for body in _bodies("noise")
    ]


@pytest.mark.real
def test_compiled_engine_equals_the_eager_engine_on_the_real_model(
    smollm2: acteng.Model, tmp_path: Path
) -> None:
    requests = _requests(smollm2, tmp_path)
    results = {}
    for compiled in (False, True):
        engine = Engine(
            smollm2, slots=4, context=256, compiled=compiled, compile_options=EAGER_COMPILE
        )
        engine.start()
        try:
            results[compiled] = [summary(e) for e in serve_all(engine, requests)]
        finally:
            engine.stop()
        assert engine.decoder is None or not engine.decoder.handle.active  # hooks gone
    eager, fast = results[False], results[True]
    assert [s["text"] for s in fast] == [s["text"] for s in eager]
    plain = fast[1]["text"]
    assert fast[0]["text"] != plain or fast[3]["text"] != plain  # steering did something
    for a, b in zip(eager, fast, strict=True):
        assert a["acteng"]["monitor"].keys() == b["acteng"]["monitor"].keys()
        for name, read in a["acteng"]["monitor"].items():
            other = b["acteng"]["monitor"][name]
            assert other["tokens"] == read["tokens"]
            assert len(other["scores"]) == len(read["scores"]) > 0
            assert other["scores"] == pytest.approx(read["scores"], abs=1e-4, rel=1e-4)
        if "guard" in a["acteng"]:
            scores = b["acteng"]["guard"]["generation_scores"]
            assert scores == pytest.approx(a["acteng"]["guard"]["generation_scores"], abs=1e-4)
    # the step left nothing behind on the model
    assert smollm2.hf.config._attn_implementation != "acteng_slots"


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def test_requests_coming_and_going_never_recompile(
    tiny_llama: acteng.Model, tmp_path: Path
) -> None:
    """Warm the few step shapes once; then other vectors, coefficients, modes, monitors,
    rows and prompt lengths only rewrite buffers."""
    model = tiny_llama
    one = random_vector(model, [0, 1, 2, 3], seed=1, scale=0.5)
    two = random_vector(model, [1, 3], seed=2, scale=0.5)
    library = VectorLibrary(tmp_path)
    library.add("one", one)
    library.add("two", two)
    resolver = Resolver(model, library)
    limits = Limits(context=128, max_tokens=16)

    def request(text: str, **extra: Any) -> GenerationRequest:
        body = {"prompt": text, "max_tokens": 6, **extra}
        return parse_request(body, chat=False, resolver=resolver, limits=limits)

    engine = Engine(model, slots=3, context=128, compiled=True, compile_options=EAGER_COMPILE)
    torch._dynamo.reset()
    counters.clear()
    engine.start()
    try:
        # Every step shape once: 0, 1 or 2 terms per layer, additions only or the full
        # formula, monitors read or not (10 graphs, one each).
        add = {"vector": "one", "coefficient": 1}
        ablate = {"vector": "two", "coefficient": 1, "mode": "ablate"}
        for steering in ([], [add], [ablate], [add, add], [add, ablate]):
            for monitor in ([], ["two"]):
                serve_all(engine, [request("a b c", steering=steering, monitor=monitor)])
        warm = _graphs()
        assert warm == 10
        texts = []
        # Dynamo's settings are per thread in recent torch, so error_on_recompile set
        # here would not reach the engine's thread: the graph count is the check.
        mixed = [
            request("one two three", steering=[{"vector": "one", "coefficient": -3}]),
            request("hello", monitor=["two", "one"]),
            request(
                "a much longer prompt than the others were",
                steering=[{"vector": "two", "coefficient": 4, "layers": [3]}],
                monitor=["one"],
            ),
            request("one two three"),
            request("q", steering=[{"vector": "one", "coefficient": 2, "mode": "clamp"}]),
        ]
        for events in serve_all(engine, mixed):
            texts.append(summary(events)["text"])
        assert _graphs() == warm
        assert texts[0] != texts[3]  # same prompt, steered vs not
    finally:
        engine.stop()


def test_compiled_engine_needs_a_fixed_batch(tiny_llama: acteng.Model) -> None:
    with pytest.raises(ConfigError, match="fixed_batch"):
        Engine(tiny_llama, slots=2, context=64, compiled=True, fixed_batch=False)
