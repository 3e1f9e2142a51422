"""JSON in and out of the server, made safe for hostile input and for non-finite numbers.

In: `decode_body` turns a request body into Python values or a `RequestError` (4xx) that
names the problem: bytes that are not UTF-8 JSON, nesting deeper than `MAX_DEPTH`, and
strings that cannot be encoded (a lone surrogate such as ``"\\ud800"`` decodes fine in
Python but fails later in the tokenizer). Every string and key is checked here, once, so
no later step meets one it cannot encode.

Out: `json_text` writes a payload as strict JSON: a NaN or infinite float (a score of a
model whose activations overflowed, say) becomes ``null``, because the browser's
``JSON.parse`` and many clients refuse the bare ``NaN`` / ``Infinity`` that Python writes.
`JSONReply` is the same as a FastAPI response class.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi.responses import JSONResponse

from acteng.errors import RequestError

__all__ = ["MAX_DEPTH", "JSONReply", "decode_body", "finite", "json_text"]

# Requests nest at most 5 levels (body > steering > item > layers > number); 32 leaves room
# for clients that add their own fields and still refuses pathological nesting.
MAX_DEPTH = 32


def _where(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "the body"


def _check_values(value: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings that cannot be encoded as UTF-8.

    Iterative, so the check itself cannot hit the recursion limit.
    """
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise RequestError(
                f"the body nests deeper than {MAX_DEPTH} levels (at {_where(path[:4])}...); "
                "send a flatter JSON object"
            )
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, [*path, str(key)[:40]])
                stack.append((child, [*path, key]))
        elif isinstance(item, list):
            stack.extend((child, [*path, i]) for i, child in enumerate(item))


def _check_text(text: str, path: list[str | int]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            f"{_where(path)} holds a character that is not valid Unicode text "
            f"({exc.reason} at index {exc.start}, e.g. a lone surrogate like \\ud800); "
            "send valid UTF-8 text",
            param=_where(path) if path else None,
        ) from None


def decode_body(data: bytes) -> Any:
    """The JSON value of a request body, checked; `RequestError` (400) on any problem.

    >>> decode_body(b'{"prompt": "hi"}')
    {'prompt': 'hi'}
    """
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the body is not valid JSON ({exc}); send a JSON object") from exc
    except RecursionError:
        raise RequestError(
            f"the body nests deeper than {MAX_DEPTH} levels; send a flatter JSON object"
        ) from None
    _check_values(value)
    return value


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (JSON ``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def json_text(payload: Any) -> str:
    """Strict JSON (no NaN or Infinity tokens) for a reply or a stream chunk."""
    return json.dumps(finite(payload), allow_nan=False)


class JSONReply(JSONResponse):
    """A JSON response that writes non-finite numbers as null instead of failing."""

    def render(self, content: Any) -> bytes:
        return json_text(content).encode("utf-8")
