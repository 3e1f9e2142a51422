"""The OpenAI side of a request body: its messages, and the fields acteng does not serve.

OpenAI refuses a field it does not know; vLLM's server ignores it with a log line. acteng
takes a middle road, so that real clients (which send their defaults for every field they
know) keep working and no request silently loses what it asked for:

- a field that would change the answer but is not served here (penalties, logit bias,
  log-probabilities, JSON mode, tools, several choices) is refused unless it holds its
  neutral value (0, false, null, empty), which is what clients send by default;
- a field whose name is a near miss of one this server reads (``steer`` for
  ``steering``, ``max_token``) is refused with the name to use: the request would
  otherwise run unsteered, or with the default length, and look as if it had worked;
- any other field (``user``, ``metadata``, ``service_tier``, ...) is ignored and listed in
  the reply's ``acteng.ignored``.

A JSON ``null`` means "absent" everywhere, as the OpenAI SDKs send it for an explicit None.
"""

from __future__ import annotations

import difflib
from typing import Any

from acteng.errors import RequestError

__all__ = ["ROLES", "SERVED", "check_fields", "messages"]

# what parse_request reads
SERVED = frozenset(
    {
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "min_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "steering",
        "monitor",
        "guard",
    }
)
# fields that change the answer and are not served, with the values that change nothing
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "repetition_penalty": (1,),  # vLLM's extension
    "top_k": (-1, 0),  # vLLM's extension (-1: off)
    "min_p": (0,),  # vLLM's extension
    "ignore_eos": (False,),  # vLLM's extension
    "stop_token_ids": ([],),  # vLLM's extension
    "bad_words": ([],),  # vLLM's extension
    "allowed_token_ids": (),  # vLLM's extension
    "guided_json": (),  # vLLM's structured output, old and new names
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "structured_outputs": (),
    "add_generation_prompt": (True,),  # vLLM's chat-template switches
    "continue_final_message": (False,),
    "skip_special_tokens": (True,),
    "logit_bias": ({},),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "echo": (False,),
    "suffix": ("",),
    "best_of": (1,),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
}
# a fuller answer where the usual one ("not supported; leave it out") says too little
WHY = {
    "n": "n must be 1 (one choice per request); send several requests",
    "best_of": "best_of must be 1 (one choice per request); send several requests",
}
# OpenAI's "developer" role is the newer name of "system"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def check_fields(body: dict[str, Any]) -> list[str]:
    """Refuse what would be served wrongly (see the module's docstring); the names of the
    fields ignored, in the body's order."""
    ignored = []
    for key, value in body.items():
        if key in SERVED or value is None:
            continue
        if key in NEUTRAL:
            if not any(_same(value, neutral) for neutral in NEUTRAL[key]):
                neutral = " or ".join(repr(v) for v in NEUTRAL[key]) or "null"
                raise RequestError(
                    WHY.get(key)
                    or f"{key} {_short(value)} is not supported by this server; leave it out "
                    f"or send {neutral}",
                    key,
                )
            continue
        near = _near_miss(key)
        if near:
            raise RequestError(
                f"unknown field {key!r}; did you mean {near!r}? (the request would run without it)",
                key,
            )
        ignored.append(key)
    return ignored


def messages(value: list[Any]) -> list[dict[str, str]]:
    """A chat's messages (a list already checked for length) as role and text; "developer"
    is read as "system", and content parts only as text."""
    if not value:
        raise RequestError("messages is empty; send at least one user message", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(
                f"{where} needs a role of system, developer, user or assistant", where
            )
        content = message.get("content")
        if content is None and role == "assistant":  # OpenAI allows it (tool calls)
            content = ""
        if isinstance(content, list):  # OpenAI content parts: only text is served
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(texts) != len(content) or any(
                p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content
            ):
                raise RequestError(f"{where}.content: only text parts are supported", where)
            content = "".join(str(t) for t in texts)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string", f"{where}.content")
        out.append({"role": ROLES[role], "content": content})
    return out


def _same(value: Any, neutral: Any) -> bool:
    if isinstance(neutral, bool | int | float):  # false and 0 are the same "off"
        return isinstance(value, bool | int | float) and value == neutral
    return bool(value == neutral)


def _near_miss(key: str) -> str | None:
    """The served field `key` is probably a typo of: a shortened or plural form of one, or
    a close spelling. Other APIs' fields that merely start with a served name
    (``prompt_cache_key``, ``stop_sequences``) are not typos, so they are left alone."""
    for name in sorted(SERVED):
        plural = name in ("steering", "monitor", "guard") and key == name + "s"
        if plural or (len(key) >= 4 and name.startswith(key)):
            return name
    close = difflib.get_close_matches(key, sorted(SERVED), n=1, cutoff=0.85)
    return close[0] if close else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
