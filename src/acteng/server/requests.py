"""The HTTP request schema: OpenAI bodies plus ``steering``, ``monitor`` and ``guard``.

`parse_request` checks a decoded JSON body field by field and turns it into a
`GenerationRequest` the engine runs. Every problem raises `RequestError` naming the field
(``steering[1].coefficient``), the value seen and what to send instead; the app turns it
into a 4xx answer in OpenAI's error format. Nothing here touches the model's weights.

Extension fields (all optional); a ``steering`` item is `SteeringSpec`'s JSON form, read by
`SteeringSpec.from_json`, and ``layers`` read as everywhere (``-1`` last, ``"11-13"``)::

    "steering": [{"vector": NAME, "coefficient": 4.0, "layers": [8], "positions": "all",
                  "mode": "add"}]
    "monitor":  [NAME, {"vector": NAME, "layers": [8]}]
    "guard":    {"detector": NAME or [NAME, ...], "policy": "flag|block|steer|stop",
                 "check": "prompt|generation|both", "threshold": 0.5,
                 "generation_threshold": 1.0, "counter": [steering items]}  or "off"

`acteng.server.schema` describes the same fields for /openapi.json. The guard's prompt
check reads every turn of a chat; message contents are always tokenized as plain text.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from acteng.errors import ConfigError, RequestError
from acteng.guard_policy import CHECKS, POLICIES, Guard
from acteng.layer_selection import parse_layers
from acteng.server.openai_fields import check_fields
from acteng.server.openai_fields import messages as read_messages
from acteng.server.resolve import Monitored, Resolver
from acteng.server.schema import MAX_GUARD_DETECTORS
from acteng.steering.spec import MAX_ABS_COEFFICIENT, SteeringSpec

if TYPE_CHECKING:
    from acteng.models import Model

__all__ = ["GenerationRequest", "Limits", "Monitored", "RequestError", "parse_request"]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the server's flags set these."""

    max_tokens: int = 512  # cap on max_tokens
    default_max_tokens: int = 128  # when the request gives none
    context: int = 1024  # prompt + generated tokens per request
    max_steering: int = 8
    max_monitors: int = 8
    max_messages: int = 256
    max_stop: int = 4
    max_coefficient: float = MAX_ABS_COEFFICIENT


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, ready for the engine."""

    prompt_ids: list[int]
    max_tokens: int
    min_tokens: int = 0  # end-of-sequence is not sampled before this many tokens
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    steering: tuple[SteeringSpec, ...] = ()
    steering_echo: list[dict[str, Any]] = field(default_factory=list)
    monitors: tuple[Monitored, ...] = ()
    guard: Guard | None = None
    guard_names: tuple[str, ...] = ()  # the guard's detectors, in its order
    guard_texts: tuple[str, ...] = ()  # what the prompt check scores: every turn
    guard_monitor: Monitored | None = None
    stream: bool = False
    include_usage: bool = False
    ignored: tuple[str, ...] = ()  # body fields not served and not refused (openai_fields)

    @property
    def monitor_names(self) -> dict[str, str]:
        return {m.key: m.name for m in self.monitors}


def _number(value: Any, param: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{param} must be a number, got {value!r}", param=param)
    if not math.isfinite(value) or not low <= value <= high:
        raise RequestError(
            f"{param} is {value}; give a finite number between {low:g} and {high:g}", param=param
        )
    return float(value)


def _integer(value: Any, param: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(
            f"{param} must be a whole number from {low} to {high}, got {value!r}", param=param
        )
    return int(value)


def _items(value: Any, param: str, limit: int) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f"{param} must be a list, got {type(value).__name__}", param=param)
    if len(value) > limit:
        raise RequestError(
            f"{param} has {len(value)} items; the server allows at most {limit}", param=param
        )
    return value


def _layers(value: Any, param: str, model: Model) -> tuple[int, ...] | None:
    """A ``layers`` field (absent: None), read as everywhere else by `parse_layers`."""
    if value is None:
        return None
    try:
        return tuple(parse_layers(model, value))
    except ConfigError as exc:
        raise RequestError(f"{param}: {exc}", param=param) from exc


def parse_steering(
    value: Any, param: str, resolver: Resolver, limits: Limits
) -> list[SteeringSpec]:
    """A list of steering items (`SteeringSpec`'s JSON form), each read by `from_json`."""
    return [
        SteeringSpec.from_json(
            item,
            functools.partial(resolver.vector, param=f"{param}[{i}].vector"),
            resolver.model,
            where=f"{param}[{i}]",
            max_coefficient=limits.max_coefficient,
        )
        for i, item in enumerate(_items(value, param, limits.max_steering))
    ]


def parse_monitors(value: Any, resolver: Resolver, limits: Limits) -> list[Monitored]:
    found: dict[str, Monitored] = {}
    for i, item in enumerate(_items(value, "monitor", limits.max_monitors)):
        where = f"monitor[{i}]"
        layers = None
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"vector", "layers"})
            if unknown or "vector" not in item:
                raise RequestError(
                    f'{where} must be a name or {{"vector": name, "layers": [...]}}', param=where
                )
            name = item["vector"]
            layers = _layers(item.get("layers"), f"{where}.layers", resolver.model)
        else:
            name = item
        monitored = resolver.monitored(name, layers, where)
        found.setdefault(monitored.key, monitored)
    return list(found.values())


def parse_guard(
    value: Any,
    default: dict[str, Any] | None,
    resolver: Resolver,
    limits: Limits,
    *,
    required: bool = False,
) -> tuple[Guard | None, tuple[str, ...], Monitored | None]:
    """The request's guard: its own fields over the server's default; "off" for none.

    ``detector`` names one detector or a list of up to `MAX_GUARD_DETECTORS` (the prompt
    fires when any of them does; several check the prompt only).

    With `required` (``--guard-required``) the default guard is enforced: a request that
    sends a ``guard`` field is refused rather than silently overruled.
    """
    if required and value is not None:
        raise RequestError(
            "this server enforces its guard (started with --guard-required); leave out the "
            "'guard' field",
            param="guard",
            status=403,
        )
    if value == "off" or (value is None and default is None):
        return None, (), None
    if value is not None and not isinstance(value, dict):
        raise RequestError('guard must be an object (e.g. {"policy": "block"}) or "off"', "guard")
    given_fields = {k: v for k, v in (value or {}).items() if v is not None}  # null: absent
    fields = {**_inherited(default, given_fields), **given_fields}
    unknown = sorted(
        set(fields)
        - {"detector", "policy", "check", "threshold", "generation_threshold", "counter"}
    )
    if unknown:
        raise RequestError(
            f"guard has unknown field(s) {unknown}; use detector, policy, check, threshold, "
            "generation_threshold, counter",
            param="guard",
        )
    names = _guard_detector_names(fields.get("detector"))
    detectors = tuple(
        resolver.detector(name, "guard.detector" if len(names) == 1 else f"guard.detector[{i}]")
        for i, name in enumerate(names)
    )
    policy, check = fields.get("policy", "flag"), fields.get("check", "prompt")
    if policy not in POLICIES:
        raise RequestError(
            f"guard.policy {policy!r}: use one of {', '.join(POLICIES)}", "guard.policy"
        )
    if check not in CHECKS:
        raise RequestError(f"guard.check {check!r}: use one of {', '.join(CHECKS)}", "guard.check")
    if len(names) > 1 and check != "prompt":
        raise RequestError(
            f"a guard over {len(names)} detectors checks the prompt only: use check "
            "'prompt', or one detector to watch the generation",
            param="guard.check",
        )
    for name, detector in zip(names, detectors, strict=True):
        if check != "generation" and detector.region == "response":
            raise RequestError(
                f"detector {name!r} reads answers (region 'response'); use check 'generation'",
                param="guard.check",
            )
    thresholds = {}
    for key in ("threshold", "generation_threshold"):
        if fields.get(key) is not None:
            thresholds[key] = _number(fields[key], f"guard.{key}", low=-1e6, high=1e6)
    counter = parse_steering(fields.get("counter"), "guard.counter", resolver, limits)
    if policy == "steer" and not counter:
        raise RequestError(
            'guard policy "steer" needs counter-steering: "counter": [{"vector": ..., '
            '"coefficient": ...}]',
            param="guard.counter",
        )
    if policy != "steer" and counter:
        raise RequestError("guard.counter is only used by policy 'steer'", "guard.counter")
    if len(names) > 1 and "threshold" in thresholds:
        raise RequestError(
            "guard.threshold overrides one detector's threshold; a guard over several uses "
            "each detector's own",
            param="guard.threshold",
        )
    try:
        guard = Guard(
            detectors,
            policy,
            check,
            tuple(counter),
            threshold=thresholds.get("threshold"),
            generation_threshold=thresholds.get("generation_threshold"),
        )
    except ConfigError as exc:
        raise RequestError(f"guard: {exc}", param="guard") from exc
    primary = names[0]
    monitor = replace(resolver.monitored(primary, None, "guard.detector"), key=f"guard:{primary}")
    return guard, names, monitor


def _inherited(default: dict[str, Any] | None, value: dict[str, Any]) -> dict[str, Any]:
    """What a request's guard takes from the server's default: not the default detector's
    thresholds when it names its own detector, nor the counter-steering when it asks for
    a policy that does not steer."""
    fields = dict(default or {})
    if value.get("detector") not in (None, fields.get("detector")):
        fields.pop("threshold", None)
        fields.pop("generation_threshold", None)
    if value.get("policy") not in (None, "steer") and value.get("counter") is None:
        fields.pop("counter", None)
    return fields


def _guard_detector_names(value: Any) -> tuple[str, ...]:
    """``guard.detector``: a name, or a list of distinct names."""
    if value is None:
        raise RequestError("guard.detector is missing: name a detector", param="guard.detector")
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise RequestError(
            "guard.detector must be a detector name or a list of names, e.g. "
            '["harmful_request", "prompt_injection"]',
            param="guard.detector",
        )
    if len(names) > MAX_GUARD_DETECTORS or len(set(names)) != len(names):
        raise RequestError(
            f"guard.detector lists {len(names)} names; give at most {MAX_GUARD_DETECTORS}, "
            "each once",
            param="guard.detector",
        )
    return tuple(names)


def parse_request(
    body: Any,
    *,
    chat: bool,
    resolver: Resolver,
    limits: Limits,
    default_guard: dict[str, Any] | None = None,
    guard_required: bool = False,
) -> GenerationRequest:
    """Check an OpenAI chat or completions body and build the engine's request."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    model = resolver.model
    ignored = check_fields(body)
    if chat:
        messages = read_messages(_items(body.get("messages"), "messages", limits.max_messages))
        ids = model.chat_ids(messages)
        # The guard reads every turn the model will read: harmful text in an earlier turn,
        # the system message or a forged assistant turn must not pass unchecked.
        guard_texts = tuple(m["content"] for m in messages if m["content"].strip())
        guard_texts = guard_texts or (messages[-1]["content"],)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt must be one non-empty string", "prompt")
        ids = list(model.tokenizer(prompt)["input_ids"])
        guard_texts = (prompt,)
    if not ids:
        raise RequestError("the prompt has no tokens; send some text", "prompt")
    # body.get: a null field reads as an absent one
    newer = body.get("max_completion_tokens") is not None
    which = "max_completion_tokens" if newer else "max_tokens"
    raw_max = body.get(which)
    if raw_max is None:  # the default never asks for more than the context has left
        left = limits.context - len(ids)
        if left < 1:
            raise RequestError(
                f"the prompt has {len(ids)} tokens and fills the server's {limits.context} "
                "tokens per request: shorten the prompt",
                param="messages" if chat else "prompt",
            )
        max_tokens = min(limits.default_max_tokens, left)
    else:
        max_tokens = _integer(raw_max, which, low=1, high=limits.max_tokens)
    max_tokens = min(max_tokens, limits.max_tokens)
    # vLLM's extension: benchmarks use it to get exactly max_tokens from every request.
    raw_min = body.get("min_tokens")
    min_tokens = 0 if raw_min is None else _integer(raw_min, "min_tokens", low=0, high=max_tokens)
    if len(ids) + max_tokens > limits.context:
        raise RequestError(
            f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}; together they "
            f"exceed the server's {limits.context} tokens per request: shorten the prompt or "
            "lower max_tokens",
            param="messages" if chat else "prompt",
        )
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else _items(stop, "stop", limits.max_stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of them", "stop")
    # Greedy unless asked: steered and unsteered answers stay reproducible side by side.
    raw_temperature = body.get("temperature")
    temperature = (
        0.0 if raw_temperature is None else _number(raw_temperature, "temperature", low=0, high=2)
    )
    raw_top_p = body.get("top_p")
    top_p = 1.0 if raw_top_p is None else _number(raw_top_p, "top_p", low=1e-6, high=1.0)
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(seed, "seed", low=0, high=2**63 - 1)
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", "stream")
    options = body.get("stream_options")
    options = {} if options is None else options
    include_usage = options.get("include_usage") if isinstance(options, dict) else "not an object"
    include_usage = False if include_usage is None else include_usage
    if not isinstance(include_usage, bool):
        raise RequestError(
            'stream_options must be an object like {"include_usage": true}', "stream_options"
        )
    specs = parse_steering(body.get("steering"), "steering", resolver, limits)
    monitors = parse_monitors(body.get("monitor"), resolver, limits)
    guard, guard_names, guard_monitor = parse_guard(
        body.get("guard"), default_guard, resolver, limits, required=guard_required
    )
    return GenerationRequest(
        prompt_ids=ids,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stops,
        steering=tuple(specs),
        steering_echo=[spec.to_json() for spec in specs],
        monitors=tuple(monitors),
        guard=guard,
        guard_names=guard_names,
        guard_texts=guard_texts,
        guard_monitor=guard_monitor,
        stream=stream,
        include_usage=include_usage,
        ignored=tuple(ignored),
    )
