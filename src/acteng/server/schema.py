"""The request bodies as OpenAPI schemas, for ``/openapi.json``.

The routes read raw bodies and `acteng.server.requests.parse_request` checks them field by
field (its messages name the field and the fix); these schemas describe the same fields,
with acteng's extensions (``steering``, ``monitor``, ``guard``), so client generators and
fuzzers such as schemathesis see what the server accepts. tests/server/test_schema.py
sends the schemas' own examples and checks that the server takes them.
"""

from __future__ import annotations

from typing import Any

from acteng.guard_policy import CHECKS, POLICIES
from acteng.steering.modes import MODES
from acteng.steering.spec import MAX_ABS_COEFFICIENT

__all__ = ["CHAT_BODY", "COMPLETION_BODY", "RESPONSES", "UPLOAD_BODY", "request_body"]

_LAYERS: dict[str, Any] = {
    "description": "layer numbers (-1 is the last block), one number, or a range '11-13'",
    "oneOf": [
        {"type": "integer"},
        {"type": "string"},
        {"type": "array", "items": {"type": "integer"}, "minItems": 1},
    ],
}

STEERING_ITEM: dict[str, Any] = {
    "type": "object",
    "required": ["vector"],
    "additionalProperties": False,
    "properties": {
        "vector": {"type": "string", "description": "a name from GET /v1/vectors"},
        "coefficient": {
            "type": "number",
            "minimum": -MAX_ABS_COEFFICIENT,
            "maximum": MAX_ABS_COEFFICIENT,
            "default": 1.0,
        },
        "layers": _LAYERS,
        "positions": {
            "type": "string",
            "description": "'all', 'prompt', 'generated' or a window 'start:end'",
            "default": "all",
        },
        "mode": {"type": "string", "enum": list(MODES), "default": "add"},
    },
}

MONITOR_ITEM: dict[str, Any] = {
    "oneOf": [
        {"type": "string", "description": "a vector or detector name"},
        {
            "type": "object",
            "required": ["vector"],
            "additionalProperties": False,
            "properties": {"vector": {"type": "string"}, "layers": _LAYERS},
        },
    ]
}

MAX_GUARD_DETECTORS = 4  # detectors one guard may watch

GUARD: dict[str, Any] = {
    "description": "a guard over the server's default guard, or 'off' (refused on a server "
    "started with --guard-required)",
    "oneOf": [
        {"type": "string", "enum": ["off"]},
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "detector": {
                    "description": "a detector, or several (the prompt fires when any does)",
                    "oneOf": [
                        {"type": "string", "minLength": 1},
                        {
                            "type": "array",
                            "items": {"type": "string", "minLength": 1},
                            "minItems": 1,
                            "maxItems": MAX_GUARD_DETECTORS,
                            "uniqueItems": True,
                        },
                    ],
                },
                "policy": {"type": "string", "enum": list(POLICIES)},
                "check": {"type": "string", "enum": list(CHECKS)},
                "threshold": {"type": "number", "minimum": -1e6, "maximum": 1e6},
                "generation_threshold": {"type": "number", "minimum": -1e6, "maximum": 1e6},
                "counter": {"type": "array", "items": STEERING_ITEM, "maxItems": 8},
            },
        },
    ],
}

_COMMON: dict[str, Any] = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "min_tokens": {"type": "integer", "minimum": 0},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "seed": {"type": "integer", "minimum": 0},
    "n": {"type": "integer", "enum": [1]},
    "stop": {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
        ]
    },
    "stream": {"type": "boolean"},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
    },
    "steering": {"type": "array", "items": STEERING_ITEM, "maxItems": 8},
    "monitor": {"type": "array", "items": MONITOR_ITEM, "maxItems": 8},
    "guard": GUARD,
}

_MESSAGE: dict[str, Any] = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {
            "oneOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {
                            "type": {"type": "string", "enum": ["text"]},
                            "text": {"type": "string"},
                        },
                    },
                },
            ]
        },
    },
}

CHAT_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1, "maxItems": 256},
        **_COMMON,
    },
    "example": {
        "messages": [{"role": "user", "content": "Tell me about your weekend."}],
        "max_tokens": 8,
        "steering": [{"vector": "refusal", "coefficient": 0.5, "layers": [10]}],
        "monitor": ["harmful_request"],
    },
}

COMPLETION_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 1},
            ]
        },
        **_COMMON,
    },
    "example": {"prompt": "Once upon a time", "max_tokens": 8},
}

UPLOAD_BODY: dict[str, Any] = {
    "type": "string",
    "format": "binary",
    "description": "a safetensors vector file (acteng's format) made for the served model",
}

_ERROR: dict[str, Any] = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": "integer"},
                        },
                    }
                },
            }
        }
    }
}

# The answers every route may give besides its success.
RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, **_ERROR}
    for code, text in (
        (400, "bad request: the message names the field and the fix"),
        (401, "missing or wrong API key"),
        (403, "not allowed: the admin key is needed, or the guard is enforced"),
        (404, "unknown model or vector name"),
        (409, "a vector of that name exists"),
        (413, "body too large"),
        (415, "the body is not sent as application/json"),
        (421, "the Host header is not one this server answers to"),
        (503, "the queue is full; retry later"),
    )
}


def request_body(schema: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
    """The ``openapi_extra`` of a route whose body is `schema`."""
    return {"requestBody": {"required": True, "content": {media: {"schema": schema}}}}
