"""Helpers for the server tests: an app on the real model, in-process or on a loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import acteng
from acteng.library import VectorLibrary
from acteng.server.app import create_app
from acteng.server.engine import Engine, Event
from acteng.server.requests import GenerationRequest, Limits

PROMPT = "Tell me about your weekend."


def make_app(
    model: acteng.Model, home: Path, *, slots: int = 16, context: int = 512, **kwargs: Any
) -> tuple[Any, Engine]:
    engine = Engine(model, slots=slots, context=context)
    limits = kwargs.pop("limits", Limits(context=context, max_tokens=256))
    app = create_app(engine, library=VectorLibrary(home), limits=limits, **kwargs)
    return app, engine


@contextmanager
def serve_on_loopback(app: Any) -> Iterator[str]:
    """Run `app` with uvicorn on a free 127.0.0.1 port; yields the base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def wait_until(condition: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def serve_all(engine: Engine, requests: list[GenerationRequest]) -> list[list[Event]]:
    """Submit every request at once (they share decoding steps) and collect the events."""
    events: list[list[Event]] = [[] for _ in requests]
    left = threading.Semaphore(0)

    def sink_for(i: int) -> Any:
        def sink(event: Event) -> None:
            events[i].append(event)
            if event.kind in ("done", "error"):
                left.release()

        return sink

    for i, request in enumerate(requests):
        engine.submit(request, sink_for(i))
    for _ in requests:
        assert left.acquire(timeout=300)
    return events


def summary(events: list[Event]) -> dict[str, Any]:
    """The summary of a request's "done" event (its last)."""
    assert events[-1].kind == "done", events[-1]
    return events[-1].summary
