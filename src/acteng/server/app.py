"""The HTTP app: OpenAI-compatible routes, ``/v1/vectors`` and the playground at ``/``.

`create_app(engine)` builds a FastAPI app around a started-on-demand `Engine`; nothing is
global, so tests build as many apps as they like. Errors follow OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, so the official SDK raises its usual
exceptions with our messages. A request that fails (bad input, a disconnect, a bug in a
step) affects that request only: steering lives in the engine's per-slot table and is
cleared when its row ends, however it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager, suppress
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from acteng.errors import ActengError, ConfigError, RequestError
from acteng.library import VectorLibrary
from acteng.models import Model
from acteng.server.body import JSONReply, decode_body
from acteng.server.engine import Engine, EngineBusy, Event, Job
from acteng.server.gate import RequestGate, check_key
from acteng.server.openai_replies import Reply, error_response, stream
from acteng.server.requests import GenerationRequest, Limits, parse_guard, parse_request
from acteng.server.resolve import Resolver
from acteng.server.schema import (
    CHAT_BODY,
    COMPLETION_BODY,
    RESPONSES,
    UPLOAD_BODY,
    request_body,
)

__all__ = ["create_app"]

MODEL_ALIASES = ("default",)


def _playground() -> str:
    return (resources.files("acteng.server") / "playground.html").read_text(encoding="utf-8")


def create_app(
    engine: Engine,
    *,
    library: VectorLibrary | None = None,
    api_key: str | None = None,
    admin_key: str | None = None,
    limits: Limits | None = None,
    default_guard: dict[str, Any] | None = None,
    guard_required: bool = False,
    allowed_hosts: Collection[str] | None = None,
) -> FastAPI:
    """The app serving `engine`'s model; the engine runs while the app does.

    `api_key` guards every /v1 route and /openapi.json; `admin_key` is needed to upload or
    delete vectors (without one, /v1/vectors is read-only). `default_guard` applies to
    every request; its detector is loaded now and pinned, so later library changes cannot
    weaken it, and with `guard_required` a request may not change it or turn it off.
    `allowed_hosts` (None: any) lists the Host names the server answers to.

    >>> app = create_app(Engine(acteng.load_model()))
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    check_key(api_key, "the API key")
    check_key(admin_key, "the admin key")
    limits = limits or Limits(context=engine.context)
    if limits.context > engine.context:
        raise ActengError(
            f"limits.context {limits.context} exceeds the engine's cache of {engine.context}"
        )
    if guard_required and default_guard is None:
        raise ConfigError("guard_required needs a default guard: name its detector")
    resolver = Resolver(engine.model, library or VectorLibrary())
    model_id = engine.model.name
    pinned: dict[str, Any] = {}
    if default_guard is not None:
        # Checked now (a bad default fails at start, not on the first request) and pinned.
        found = default_guard.get("detector")
        names = found if isinstance(found, list) else [found]
        pins = [resolver.pin(name, "the default guard's detector") for name in names]
        # one detector: its pin; several: the same keys, each a list in the guard's order
        pinned = pins[0] if len(pins) == 1 else {k: [p[k] for p in pins] for k in pins[0]}
        parse_guard(None, default_guard, resolver, limits)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    # No /docs: FastAPI's docs page loads scripts from a CDN, and this server loads nothing.
    # /openapi.json describes the routes and acteng's request fields (behind the API key).
    app = FastAPI(
        title="acteng",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        default_response_class=JSONReply,
        responses=RESPONSES,
    )

    app.add_middleware(
        RequestGate,
        api_key=api_key,
        admin_key=admin_key,
        allowed_hosts=None if allowed_hosts is None else frozenset(allowed_hosts),
    )

    @app.exception_handler(RequestError)
    async def requesterror_response(_r: Request, exc: RequestError) -> JSONReply:
        return error_response(exc.status, str(exc), param=exc.param)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(_r: Request, exc: RequestValidationError) -> JSONReply:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return error_response(400, f"bad parameters: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_r: Request, exc: StarletteHTTPException) -> JSONReply:
        # unknown routes and methods, in OpenAI's error shape like every other answer
        reply = error_response(exc.status_code, str(exc.detail))
        for key, value in (exc.headers or {}).items():
            reply.headers[key] = value
        return reply

    @app.exception_handler(EngineBusy)
    async def busy(_r: Request, exc: EngineBusy) -> JSONReply:
        return error_response(503, str(exc))

    @app.exception_handler(ActengError)
    async def actengerror_response(_r: Request, exc: ActengError) -> JSONReply:
        return error_response(400, str(exc))

    async def body_json(request: Request) -> Any:
        data = await request.body()  # the gate has already refused bodies over the limit
        return await run_in_threadpool(decode_body, data)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(
            _playground(),
            headers={
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:"
            },
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": "ok",
            "active": engine.active,
            "queued": engine.queue.qsize(),
        }
        if default_guard is not None:
            out["guard"] = {**pinned, "required": guard_required}
        return out

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        m = engine.model
        return {
            "object": "list",
            "data": [
                {
                    "id": model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "acteng",
                    "acteng": {
                        "layers": m.num_layers,
                        "hidden_size": m.hidden_size,
                        # the folder's name only: its path is the server's business
                        "adapter": adapter_name(m),
                    },
                }
            ],
        }

    @app.get("/v1/vectors")
    async def list_vectors() -> dict[str, Any]:
        return {"object": "list", "data": await run_in_threadpool(resolver.list)}

    @app.get("/v1/vectors/{name}")
    async def show_vector(name: str) -> dict[str, Any]:
        return await run_in_threadpool(resolver.show, name)

    @app.post(
        "/v1/vectors",
        status_code=201,
        openapi_extra=request_body(UPLOAD_BODY, "application/octet-stream"),
    )
    async def upload_vector(
        request: Request, name: str, tags: str = "", overwrite: bool = False
    ) -> JSONReply:
        data = await request.body()
        tag_list = [t for t in tags.split(",") if t]
        item = await run_in_threadpool(
            lambda: resolver.upload(name, data, tags=tag_list, overwrite=overwrite)
        )
        return JSONReply(item, status_code=201)

    @app.delete("/v1/vectors/{name}")
    async def delete_vector(name: str) -> dict[str, Any]:
        await run_in_threadpool(resolver.delete, name)
        return {"id": name, "object": "vector", "deleted": True}

    async def generate(request: Request, chat: bool) -> Response:
        body = await body_json(request)
        wanted = body.get("model") if isinstance(body, dict) else None
        if wanted is not None and not isinstance(wanted, str):
            raise RequestError(f"model must be a string, got {wanted!r}", param="model")
        if wanted is not None and wanted not in (model_id, *MODEL_ALIASES):
            raise RequestError(
                f"model {wanted!r} is not served here; use {model_id!r} (GET /v1/models)",
                param="model",
                status=404,
            )
        parsed: GenerationRequest = await run_in_threadpool(
            lambda: parse_request(
                body,
                chat=chat,
                resolver=resolver,
                limits=limits,
                default_guard=default_guard,
                guard_required=guard_required,
            )
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            # RuntimeError: the event loop is gone, so nobody is listening any more.
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = engine.submit(parsed, sink)
        reply = Reply(chat, model_id)
        if parsed.stream:
            return StreamingResponse(
                stream(job, events, reply, parsed.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await _collect(request, job, events, reply)

    @app.post("/v1/chat/completions", openapi_extra=request_body(CHAT_BODY))
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    @app.post("/v1/completions", openapi_extra=request_body(COMPLETION_BODY))
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    return app


async def _collect(
    request: Request, job: Job, events: asyncio.Queue[Event], reply: Reply
) -> Response:
    """Wait for the whole answer, cancelling the job if the client disconnects."""
    parts: list[str] = []
    loop = asyncio.get_running_loop()
    checked = loop.time()
    try:
        while True:
            # Look for a disconnect every 0.25 s, also while tokens keep arriving (a fast
            # engine would otherwise generate a long answer nobody reads to the end).
            event: Event | None = None
            with suppress(TimeoutError):
                event = await asyncio.wait_for(events.get(), timeout=0.25)
            if loop.time() - checked >= 0.25 or event is None:
                checked = loop.time()
                if await request.is_disconnected():
                    job.cancel()
                    return Response(status_code=499)
            if event is None:
                continue
            if event.kind == "token":
                parts.append(event.text)
            elif event.kind == "done":
                return JSONReply(
                    reply.full(
                        event.summary.get("text", "".join(parts)),
                        event.finish_reason,
                        event.summary,
                    )
                )
            else:
                return error_response(event.status, event.text)
    finally:
        job.cancel()


def adapter_name(model: Model) -> str | None:
    """The name of the adapter folder `model` was loaded with, if any."""
    adapter = None if model.recipe is None else model.recipe.adapter
    return None if adapter is None else Path(adapter).name
