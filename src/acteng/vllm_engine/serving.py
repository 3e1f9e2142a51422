"""``acteng serve --engine vllm``: the HTTP app over a `VllmEngine`, and a clean exit.

The server ends on SIGINT or SIGTERM, and so do vLLM's processes. uvicorn handles both
signals while it serves, shuts the app down, then raises the signal once more under the
handler that was there before it. For SIGTERM that used to be the default action, which
ends the process on the spot: no ``finally`` ran, so vLLM's engine-core process (and the
worker it starts) lived on, re-parented to init, holding the model's memory and a core.
`serve_with_vllm` therefore makes SIGTERM raise `SystemExit` (as SIGINT raises
`KeyboardInterrupt`) from the moment vLLM starts, and always closes the engine
(`VllmEngine.close`: vLLM's own shutdown, then any child still alive is ended).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from acteng.models import Model
from acteng.server.settings import ServeSettings
from acteng.vllm_engine import require_vllm
from acteng.vllm_engine.engine import STOP_TIMEOUT_S, VllmEngine, end_children

__all__ = ["GRACE_S", "check_serving", "serve_with_vllm"]

# Streams still open when a signal comes get this long to end, then are cut.
GRACE_S = 5


def check_serving(settings: ServeSettings) -> None:
    """Fail before anything loads when `settings` cannot be served with vLLM."""
    require_vllm("acteng serve --engine vllm")


def serve_with_vllm(
    model: Model, settings: ServeSettings, *, host: str, port: int, dtype: str | None = None
) -> int:
    """Serve `model` over HTTP with vLLM decoding until SIGINT or SIGTERM (``acteng serve
    --engine vllm``); `dtype` is vLLM's (default: the model's).

    Either signal ends the server and then vLLM's processes (`VllmEngine.close`), within
    about 30 s; SIGTERM exits with status 143.
    """
    from typing import cast

    import uvicorn

    from acteng.library import VectorLibrary
    from acteng.server.app import create_app
    from acteng.server.engine import Engine
    from acteng.server.requests import parse_guard
    from acteng.server.resolve import Resolver

    check_serving(settings)
    library = VectorLibrary(settings.home)
    if settings.guard is not None:  # fail now, not on the first request
        parse_guard(None, settings.guard, Resolver(model, library), settings.limits)
    # vLLM's processes resolve the same vector names through the same library.
    os.environ["ACTENG_HOME"] = str(library.home)
    engine: VllmEngine | None = None
    with _signals_end_serving():
        try:
            engine = VllmEngine(
                model,
                dtype=dtype,
                slots=settings.slots,
                context=settings.context,
                max_queue=settings.max_queue,
            )
            # create_app needs only the interface VllmEngine shares with Engine (model,
            # context, queue, active, start, stop, submit).
            app = create_app(cast(Engine, engine), library=library, **settings.app_options())
            print(f"acteng: serving {model.name} with vLLM on http://{host}:{port}", flush=True)
            # Streams still open at shutdown get GRACE_S to end, then are cut.
            uvicorn.run(
                app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE_S
            )
        finally:
            # A second signal must not cut the shutdown short (it is bounded anyway).
            with _signals_ignored():
                if engine is not None:
                    engine.close()
                else:  # vLLM failed or was interrupted while starting
                    end_children(STOP_TIMEOUT_S)
    return 0


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _signals_end_serving() -> Iterator[None]:
    """Make SIGTERM end serving by an exception, as SIGINT does, so that cleanup runs.

    uvicorn handles SIGINT and SIGTERM while it serves, shuts the app down, then raises the
    signal again under the handler that was there before it. For SIGTERM that was the
    default action, which ends the process on the spot: no ``finally`` ran, and vLLM's
    engine-core process (and its worker) lived on, re-parented to init. Under this handler
    the re-raised SIGTERM raises `SystemExit`, as it does when SIGTERM comes while vLLM
    is still starting.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; its owner handles them
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
