"""The checks every request passes before a route runs: Host, keys, content type, size.

`RequestGate` is plain ASGI middleware in front of the app. It enforces, in order:
the Host names the server answers to (a loopback server refuses other names, which is what
a DNS-rebinding page sends), the API key on /v1 and /openapi.json, the admin key for
writing to /v1/vectors (read-only without one), JSON content type on the generation routes
(so a web page cannot send them as a "simple" cross-site request), and the body size,
counted while the body arrives.
"""

from __future__ import annotations

import hmac

from fastapi.responses import Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from acteng.errors import ConfigError
from acteng.server.openai_replies import error_response
from acteng.server.resolve import MAX_UPLOAD_BYTES

__all__ = ["LOOPBACK_HOSTS", "MAX_BODY_BYTES", "MIN_KEY_LENGTH", "RequestGate", "check_key"]

MAX_BODY_BYTES = 1024 * 1024
MIN_KEY_LENGTH = 16
# Host names a loopback server answers to: a browser page that points its own domain at
# 127.0.0.1 (DNS rebinding) sends its own name, and is refused.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def check_key(key: str | None, what: str) -> None:
    """Refuse keys short enough to guess: `what` names the option in the message."""
    if key is not None and len(key) < MIN_KEY_LENGTH:
        raise ConfigError(
            f"{what} has {len(key)} characters; use at least {MIN_KEY_LENGTH} (e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(24))')"
        )


class RequestGate:
    """Host, key, content-type and body-size checks before any endpoint runs (plain ASGI).

    Not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware hands the endpoint a
    wrapped ``receive`` through which ``request.is_disconnected()`` never sees the
    client leave, so a non-streamed request would generate to the end for nobody.

    The body is read here, counting bytes as they arrive, so a chunked body (no
    Content-Length) is refused as soon as it passes the limit instead of being buffered
    whole; the endpoint then reads the buffered messages, and after them the client's own
    ``receive`` (where a disconnect shows).
    """

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        admin_key: str | None,
        allowed_hosts: frozenset[str] | None,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.admin_key = admin_key
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rejected = self._check(scope)
        if rejected is None and scope["method"] in ("POST", "PUT", "PATCH"):
            messages, rejected = await _read_body(receive, _body_limit(scope["path"]))
            receive = _replay(messages, receive)
        if rejected is not None:
            await rejected(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).setdefault("X-Content-Type-Options", "nosniff")
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _given_key(self, headers: Headers) -> str:
        header = headers.get("authorization", "")
        return header[7:] if header.lower().startswith("bearer ") else ""

    def _check(self, scope: Scope) -> Response | None:
        path: str = scope["path"]
        method: str = scope["method"]
        headers = Headers(scope=scope)
        if self.allowed_hosts is not None:
            host = _host_name(headers.get("host", ""))
            if host not in self.allowed_hosts:
                return error_response(
                    421,
                    f"this server does not answer to host {host!r}; it answers to "
                    f"{sorted(self.allowed_hosts)} (start it with --allowed-hosts to add names)",
                )
        given = self._given_key(headers)
        keys = [k for k in (self.api_key, self.admin_key) if k is not None]
        protected = path.startswith("/v1") or path == "/openapi.json"
        if self.api_key is not None and protected and not any(_same(given, k) for k in keys):
            return error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
        if path.startswith("/v1/vectors") and method not in ("GET", "HEAD", "OPTIONS"):
            if self.admin_key is None:
                return error_response(
                    403,
                    "the vector library is read-only over HTTP; to upload or delete vectors "
                    "start the server with --admin-key (or $ACTENG_ADMIN_KEY) and send that "
                    "key, or use `acteng vectors` on the server's machine",
                )
            if not _same(given, self.admin_key):
                return error_response(
                    403, "uploading or deleting vectors needs the admin key as the bearer key"
                )
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            # A web page can send a "simple" cross-site POST (text/plain, forms) without the
            # browser asking the server first; JSON needs that preflight, which we never grant.
            if media != "application/json":
                return error_response(
                    415, "send the body as JSON with 'Content-Type: application/json'"
                )
        size = headers.get("content-length")
        limit = _body_limit(path)
        if size is not None and size.isdigit() and int(size) > limit:
            return error_response(413, f"the body has {size} bytes; the limit is {limit}")
        return None


def _body_limit(path: str) -> int:
    return MAX_UPLOAD_BYTES if path == "/v1/vectors" else MAX_BODY_BYTES


def _same(given: str, key: str | None) -> bool:
    return key is not None and hmac.compare_digest(given.encode(), key.encode())


def _host_name(host: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _read_body(receive: Receive, limit: int) -> tuple[list[Message], Response | None]:
    """The request's body messages, or a 413 as soon as they pass `limit` bytes."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None  # the client left; the endpoint will see it
        size += len(message.get("body", b""))
        if size > limit:
            return messages, error_response(
                413, f"the body has more than {limit} bytes; the limit is {limit}"
            )
        if not message.get("more_body", False):
            return messages, None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
