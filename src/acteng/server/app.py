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
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from acteng.errors import ActengError, RequestError
from acteng.library import VectorLibrary
from acteng.server.engine import Engine, EngineBusy, Event, Job
from acteng.server.openai_replies import Reply, error_response, stream
from acteng.server.requests import GenerationRequest, Limits, parse_request
from acteng.server.resolve import MAX_UPLOAD_BYTES, Resolver

__all__ = ["create_app"]

MAX_BODY_BYTES = 1024 * 1024
MODEL_ALIASES = ("default",)


def _playground() -> str:
    return (resources.files("acteng.server") / "playground.html").read_text(encoding="utf-8")


def create_app(
    engine: Engine,
    *,
    library: VectorLibrary | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
    default_guard: dict[str, Any] | None = None,
) -> FastAPI:
    """The app serving `engine`'s model; the engine runs while the app does.

    >>> app = create_app(Engine(acteng.load_model()))
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    limits = limits or Limits(context=engine.context)
    if limits.context > engine.context:
        raise ActengError(
            f"limits.context {limits.context} exceeds the engine's cache of {engine.context}"
        )
    resolver = Resolver(engine.model, library or VectorLibrary())
    model_id = engine.model.name

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    # No /docs: FastAPI's docs page loads scripts from a CDN, and this server loads nothing.
    app = FastAPI(
        title="acteng", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )

    app.add_middleware(_RequestGate, api_key=api_key)

    @app.exception_handler(RequestError)
    async def requesterror_response(_r: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, str(exc), param=exc.param)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(_r: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return error_response(400, f"bad parameters: {problems}")

    @app.exception_handler(EngineBusy)
    async def busy(_r: Request, exc: EngineBusy) -> JSONResponse:
        return error_response(503, str(exc))

    @app.exception_handler(ActengError)
    async def actengerror_response(_r: Request, exc: ActengError) -> JSONResponse:
        return error_response(400, str(exc))

    async def body_json(request: Request) -> Any:
        data = await request.body()
        if len(data) > MAX_BODY_BYTES:
            raise RequestError(
                f"the body has {len(data)} bytes; the limit is {MAX_BODY_BYTES}", status=413
            )
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the body is not valid JSON ({exc}); send a JSON object") from exc

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
        return {"status": "ok", "active": engine.active, "queued": engine.queue.qsize()}

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
                    "acteng": {"layers": m.num_layers, "hidden_size": m.hidden_size},
                }
            ],
        }

    @app.get("/v1/vectors")
    async def list_vectors() -> dict[str, Any]:
        return {"object": "list", "data": await run_in_threadpool(resolver.list)}

    @app.get("/v1/vectors/{name}")
    async def show_vector(name: str) -> dict[str, Any]:
        return await run_in_threadpool(resolver.show, name)

    @app.post("/v1/vectors")
    async def upload_vector(
        request: Request, name: str, tags: str = "", overwrite: bool = False
    ) -> JSONResponse:
        data = await request.body()
        tag_list = [t for t in tags.split(",") if t]
        item = await run_in_threadpool(
            lambda: resolver.upload(name, data, tags=tag_list, overwrite=overwrite)
        )
        return JSONResponse(item, status_code=201)

    @app.delete("/v1/vectors/{name}")
    async def delete_vector(name: str) -> dict[str, Any]:
        await run_in_threadpool(resolver.delete, name)
        return {"id": name, "object": "vector", "deleted": True}

    async def generate(request: Request, chat: bool) -> Response:
        body = await body_json(request)
        wanted = body.get("model") if isinstance(body, dict) else None
        if wanted is not None and wanted not in (model_id, *MODEL_ALIASES):
            raise RequestError(
                f"model {wanted!r} is not served here; use {model_id!r} (GET /v1/models)",
                param="model",
                status=404,
            )
        parsed: GenerationRequest = await run_in_threadpool(
            lambda: parse_request(
                body, chat=chat, resolver=resolver, limits=limits, default_guard=default_guard
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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    return app


class _RequestGate:
    """API key and body-size checks before any endpoint runs, as plain ASGI middleware.

    Not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware hands the endpoint a
    wrapped ``receive`` through which ``request.is_disconnected()`` never sees the
    client leave, so a non-streamed request would generate to the end for nobody.
    """

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rejected = self._check(scope)
        if rejected is not None:
            await rejected(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).setdefault("X-Content-Type-Options", "nosniff")
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _check(self, scope: Scope) -> Response | None:
        path: str = scope["path"]
        headers = Headers(scope=scope)
        if self.api_key is not None and path.startswith("/v1"):
            header = headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return error_response(
                    401, "missing or wrong API key: send 'Authorization: Bearer KEY'"
                )
        size = headers.get("content-length")
        limit = MAX_UPLOAD_BYTES if path == "/v1/vectors" else MAX_BODY_BYTES
        if size is not None and size.isdigit() and int(size) > limit:
            return error_response(413, f"the body has {size} bytes; the limit is {limit}")
        return None


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
                return JSONResponse(
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
