"""OpenAI's response shapes: completion objects, stream chunks, usage and errors.

The routes in `acteng.server.app` hand the engine's events here; nothing here knows about
the engine's internals or the model. Chunks are server-sent events (``data: {...}``), the
last one carrying the request's ``acteng`` extension (guard verdict, monitor means).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from acteng.server.body import JSONReply, json_text
from acteng.server.engine import Event, Job

__all__ = ["Reply", "error_response", "final_acteng", "stream", "usage"]


MAX_MESSAGE = 2000  # characters of an error message; the rest is cut


def error_response(
    status: int, message: str, *, param: str | None = None, kind: str = ""
) -> JSONReply:
    """An error answer in OpenAI's shape, so the official SDK raises its usual exception."""
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        405: "invalid_request_error",
        409: "conflict_error",
        413: "request_too_large",
        415: "invalid_request_error",
        421: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable_error",
    }
    if len(message) > MAX_MESSAGE:  # a message that quotes a huge bad value back
        message = message[: MAX_MESSAGE - 30] + f" ... ({len(message)} characters, cut)"
    return JSONReply(
        {
            "error": {
                "message": message,
                "type": kind or kinds.get(status, "server_error" if status >= 500 else "error"),
                "param": param,
                "code": status,
            }
        },
        status_code=status,
    )


class Reply:
    """OpenAI response and chunk objects for one request."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _base(self, stream: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind + (".chunk" if stream and self.chat else ""),
            "created": self.created,
            "model": self.model,
        }

    def chunk(self, text: str | None, finish: str | None, acteng: dict[str, Any]) -> str:
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        payload = {**self._base(True), "choices": [choice], "acteng": acteng}
        return f"data: {json_text(payload)}\n\n"

    def role_chunk(self) -> str:
        payload = {
            **self._base(True),
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ],
        }
        return f"data: {json_text(payload)}\n\n"

    def usage_chunk(self, usage: dict[str, int]) -> str:
        payload = {**self._base(True), "choices": [], "usage": usage}
        return f"data: {json_text(payload)}\n\n"

    def full(self, text: str, finish: str | None, summary: dict[str, Any]) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {
            **self._base(False),
            "choices": [choice],
            "usage": usage(summary),
            "acteng": summary.get("acteng", {}),
        }


def usage(summary: dict[str, Any]) -> dict[str, int]:
    prompt, completion = summary.get("prompt_tokens", 0), summary.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def final_acteng(summary: dict[str, Any]) -> dict[str, Any]:
    """The last chunk's extension: the guard verdict and each monitor's mean."""
    ext = dict(summary.get("acteng", {}))
    ext["monitor"] = {
        name: {k: v for k, v in entry.items() if k not in ("tokens", "scores", "prompt_scores")}
        for name, entry in ext.get("monitor", {}).items()
    }
    guard = ext.get("guard")
    if guard is not None and guard.get("action") == "block":
        ext["guard"] = {**guard, "replacement": summary.get("text", "")}
    return ext


async def stream(
    job: Job, events: asyncio.Queue[Event], reply: Reply, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events until the job ends; leaving early (a disconnect) cancels it."""
    try:
        if reply.chat:
            yield reply.role_chunk()
        while True:
            event = await events.get()
            if event.kind == "token":
                ext = {"tokens": event.tokens, "monitor": event.scores} if event.tokens else {}
                yield reply.chunk(event.text, None, ext)
            elif event.kind == "done":
                summary = event.summary
                guard = summary.get("acteng", {}).get("guard") or {}
                text = None
                if guard.get("fired_on") == "prompt" and guard.get("action") == "block":
                    text = summary.get("text")  # nothing was streamed: send the refusal
                yield reply.chunk(text, event.finish_reason, final_acteng(summary))
                if include_usage:
                    yield reply.usage_chunk(usage(summary))
                yield "data: [DONE]\n\n"
                return
            else:
                error = {
                    "error": {"message": event.text, "type": "server_error", "code": event.status}
                }
                yield f"data: {json_text(error)}\n\n"
                return
    finally:
        job.cancel()  # a no-op once done; frees the slot when the client went away
