"""Batching over a real loopback socket: results independent of the batch, disconnects."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

import acteng  # noqa: E402
from tests.server.serving import PROMPT, make_app, serve_on_loopback, wait_until  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.slow]

TARGET = {
    "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
    "max_tokens": 40,
    "steering": [{"vector": "refusal", "coefficient": 0.5}],
}


def _others(round_: int, noise: str) -> list[dict[str, Any]]:
    """15 requests with other prompts, lengths and steering (4 settings, modes mixed)."""
    settings: list[list[dict[str, Any]]] = [
        [],
        [{"vector": "refusal", "coefficient": 1.0}],
        [{"vector": noise, "coefficient": 3.0, "positions": "generated"}],
        [{"vector": "refusal", "coefficient": 0.7, "mode": "ablate"}],
    ]
    return [
        {
            "messages": [{"role": "user", "content": f"Tell me fact {i + 3 * round_} about cats."}],
            "max_tokens": 20 + (7 * i + round_) % 30,
            "steering": settings[i % 4],
            "monitor": ["honesty"] if i % 3 == 0 else [],
        }
        for i in range(15)
    ]


@pytest.fixture(scope="module")
def server(
    smollm2: acteng.Model, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Any]]:
    import torch

    home: Path = tmp_path_factory.mktemp("library")
    g = torch.Generator().manual_seed(3)
    noise = acteng.SteeringVector({8: torch.randn(576, generator=g)}, {"method": "random"})
    acteng.VectorLibrary(home).add("noise", noise)
    app, engine = make_app(smollm2, home)
    with serve_on_loopback(app) as url:
        yield url, engine


def _sdk(url: str) -> Any:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _ask(sdk: Any, body: dict[str, Any]) -> str:
    extra = {k: v for k, v in body.items() if k in ("steering", "monitor") and v}
    response = sdk.chat.completions.create(
        model="default",
        messages=body["messages"],
        max_tokens=body["max_tokens"],
        extra_body=extra or None,
    )
    return str(response.choices[0].message.content)


def test_alone_equals_among_fifteen_others(server: tuple[str, Any]) -> None:
    url, engine = server
    alone = _ask(_sdk(url), TARGET)
    for round_ in range(4):
        results: dict[Any, str] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(16)

        def worker(
            key: Any,
            body: dict[str, Any],
            results: dict[Any, str] = results,
            errors: list[BaseException] = errors,
            barrier: threading.Barrier = barrier,
        ) -> None:
            try:
                client = _sdk(url)
                barrier.wait(timeout=60)
                results[key] = _ask(client, body)
            except BaseException as exc:  # reported below
                errors.append(exc)

        bodies = _others(round_, "noise")
        threads = [threading.Thread(target=worker, args=(i, b)) for i, b in enumerate(bodies)]
        # the target joins at a different point in each round
        threads.insert(round_ * 4, threading.Thread(target=worker, args=("target", TARGET)))
        engine.max_rows_seen = 0
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert engine.max_rows_seen >= 8, "the requests were not batched together"
        assert results["target"] == alone, f"round {round_}"
    # and alone again, after all that
    assert _ask(_sdk(url), TARGET) == alone


def test_other_rows_alone_equal_batched(server: tuple[str, Any]) -> None:
    """Every row, not just the target: each batched answer equals the same request alone."""
    url, _engine = server
    bodies = _others(7, "noise")[:8]
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        results[i] = _ask(_sdk(url), bodies[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sdk = _sdk(url)
    for i, body in enumerate(bodies):
        assert results[i] == _ask(sdk, body), f"request {i}"


def test_stream_disconnect_frees_the_slot(server: tuple[str, Any], smollm2: acteng.Model) -> None:
    url, engine = server
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 200,
        "stream": True,
        "steering": [{"vector": "refusal", "coefficient": 1.0}],
    }
    before = engine.steps
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert any(line.startswith("data:") for line in seen)
        assert engine.active == 1
    # leaving the block closed the connection mid-stream
    assert wait_until(lambda: engine.active == 0), "the slot was not freed"
    assert engine.steps - before < 150  # it stopped long before 200 tokens
    assert all(engine.table.is_empty(s) for s in range(1, engine.slots + 1))
    [expected] = acteng.generate(smollm2, PROMPT, max_new_tokens=8)
    plain = {"messages": body["messages"], "max_tokens": 8}
    assert _ask(_sdk(url), plain) == expected


def test_non_stream_disconnect_cancels(server: tuple[str, Any]) -> None:
    url, engine = server
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 250}
    before = engine.steps
    with httpx.Client(timeout=1.5) as client, pytest.raises(httpx.TimeoutException):
        client.post(url + "/v1/chat/completions", json=body)
    assert wait_until(lambda: engine.active == 0, timeout=30)
    assert engine.steps - before < 200  # cancelled, not run to its 250 tokens
