"""``acteng serve``: the OpenAI-compatible server with per-request steering and a playground."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acteng.cli.common import (
    add_model_args,
    parse_vector_arg,
    settle_guard_options,
    warn_other_model,
)
from acteng.errors import ConfigError, missing_extra

if TYPE_CHECKING:
    from acteng.server.settings import ServeSettings

API_KEY_ENV = "ACTENG_API_KEY"
ADMIN_KEY_ENV = "ACTENG_ADMIN_KEY"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve POST /v1/chat/completions and /v1/completions (streaming too) "
        "with per-request steering, monitor and guard fields, /v1/models, /v1/vectors "
        "over the vector library, and a playground at /. Binds 127.0.0.1 unless told "
        f"otherwise; any other address needs an API key (--api-key or ${API_KEY_ENV}).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV})",
    )
    p.add_argument(
        "--admin-key",
        default=None,
        help="key that may upload and delete vectors over HTTP (default: "
        f"${ADMIN_KEY_ENV}; without one, /v1/vectors is read-only)",
    )
    p.add_argument(
        "--allowed-hosts",
        default=None,
        help="comma-separated Host names to answer to, or '*' for any (default: the "
        "loopback names when bound to loopback, else any: the API key protects it)",
    )
    p.add_argument(
        "--engine",
        choices=("transformers", "vllm"),
        default="transformers",
        help="transformers (default) or vllm: decode with upstream vLLM and acteng's plugin "
        "(needs acteng[vllm])",
    )
    p.add_argument("--slots", type=int, default=16, help="requests decoded together (16)")
    p.add_argument(
        "--context", type=int, default=1024, help="prompt + generated tokens per request (1024)"
    )
    p.add_argument("--max-tokens", type=int, default=512, help="cap on a request's max_tokens")
    p.add_argument("--queue", type=int, default=256, help="requests that may wait (256)")
    p.add_argument(
        "--no-fixed-batch",
        action="store_true",
        help="decode only the live rows: faster for a lone request, but answers may then "
        "change in the last bits (sometimes the greedy text) with what else is in the batch",
    )
    p.add_argument("--home", default=None, help="vector library folder (default $ACTENG_HOME)")
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="serve N copies of the app through Ray Serve (needs acteng[ray]; attaches to "
        "$RAY_ADDRESS or starts a local Ray cluster)",
    )
    g = p.add_argument_group(
        "default guard (a request may change or turn it off, unless --guard-required)"
    )
    g.add_argument(
        "--guard",
        action="append",
        default=None,
        help="detector name for every request; repeat to watch several (e.g. --guard "
        "harmful_request --guard prompt_injection: the prompt fires when any does)",
    )
    g.add_argument("--policy", default=None, help="flag (default) | block | steer | stop")
    g.add_argument("--check", default=None, help="prompt (default) | generation | both")
    g.add_argument("--counter", action="append", default=[], help="NAME:C counter-steering")
    g.add_argument("--threshold", type=float, help="override the detector's threshold")
    g.add_argument(
        "--generation-threshold",
        type=float,
        help="threshold of the answer's running score for --check generation/both "
        "(default: the prompt's; calibrate it with acteng.guard.calibrate_generation)",
    )
    g.add_argument(
        "--guard-required",
        action="store_true",
        help="enforce the default guard: requests that send a 'guard' field are refused",
    )
    add_model_args(p)
    p.set_defaults(run=run_serve)


def is_loopback(host: str) -> bool:
    """True for localhost and addresses in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise ConfigError(
            f"binding {host} exposes the server beyond this machine; set an API key with "
            f"--api-key KEY or ${API_KEY_ENV}, or bind 127.0.0.1"
        )


def allowed_hosts(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The Host names to answer to: loopback names on a loopback bind (a web page reaching
    127.0.0.1 through DNS rebinding sends its own name), any name elsewhere (there the
    API key is required, and a page cannot know it)."""
    if args.allowed_hosts is not None:
        names = tuple(h.strip().lower().strip("[]") for h in args.allowed_hosts.split(","))
        return None if "*" in names else tuple(h for h in names if h)
    if is_loopback(args.host):
        from acteng.server.gate import LOOPBACK_HOSTS

        return tuple(dict.fromkeys((*LOOPBACK_HOSTS, args.host.strip("[]").lower())))
    return None


def default_guard(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.guard is None:
        return None
    counter = []
    for text in args.counter:
        name, coefficient = parse_vector_arg(text)
        counter.append({"vector": name, "coefficient": coefficient})
    names = [args.guard] if isinstance(args.guard, str) else list(args.guard)
    detector: str | list[str] = names[0] if len(names) == 1 else names
    guard: dict[str, Any] = {
        "detector": detector,
        "policy": args.policy or "flag",
        "check": args.check or "prompt",
    }
    if counter:
        guard["counter"] = counter
    for key in ("threshold", "generation_threshold"):
        if getattr(args, key, None) is not None:
            guard[key] = getattr(args, key)
    return guard


def serve_settings(
    args: argparse.Namespace, api_key: str | None, admin_key: str | None = None
) -> ServeSettings:
    """The flags of ``acteng serve`` as the typed settings the server is built from."""
    from acteng.server.settings import ServeSettings

    return ServeSettings(
        slots=args.slots,
        context=args.context,
        max_queue=args.queue,
        fixed_batch=not args.no_fixed_batch,
        max_tokens=args.max_tokens,
        # absolute: Ray Serve replicas may start in another folder
        home=None if args.home is None else os.fspath(Path(args.home).expanduser().resolve()),
        api_key=api_key,
        admin_key=admin_key,
        guard=default_guard(args),
        guard_required=bool(getattr(args, "guard_required", False)),
        allowed_hosts=allowed_hosts(args),
    )


def run_serve(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    admin_key = args.admin_key or os.environ.get(ADMIN_KEY_ENV) or None
    check_binding(args.host, api_key)
    if args.guard_required and args.guard is None:
        raise ConfigError("--guard-required needs --guard NAME: the detector to enforce")
    settle_guard_options(args)
    try:
        import uvicorn

        from acteng.server.app import create_app
        from acteng.server.gate import check_key
    except ImportError as exc:
        raise missing_extra(exc.name or "fastapi", "serve", purpose="acteng serve") from exc
    from acteng.cli.common import load_model_from_args

    check_key(api_key, "the API key")  # before the model loads
    check_key(admin_key, "the admin key")
    settings = serve_settings(args, api_key, admin_key)
    if args.engine == "vllm":
        from acteng.vllm_engine.serving import check_serving, serve_with_vllm

        check_serving(settings)  # before the model loads
        return serve_with_vllm(
            load_model_from_args(args), settings, host=args.host, port=args.port, dtype=args.dtype
        )
    from acteng.library import VectorLibrary
    from acteng.server.engine import Engine
    from acteng.server.requests import parse_guard
    from acteng.server.resolve import Resolver

    model = load_model_from_args(args)
    library = VectorLibrary(settings.home)
    for name in args.guard or []:
        warn_other_model(name, _guard_detector(Resolver(model, library), name), model)
    if args.replicas is not None:
        from acteng.server.replicas import run_replicas

        if settings.guard is not None:  # fail here, not in every replica
            parse_guard(None, settings.guard, Resolver(model, library), settings.limits)

        return run_replicas(model, args.replicas, args.host, args.port, settings)
    engine = Engine(
        model,
        slots=settings.slots,
        context=settings.context,
        max_queue=settings.max_queue,
        fixed_batch=settings.fixed_batch,
    )
    # create_app checks and pins the default guard before serving
    app = create_app(engine, library=library, **settings.app_options())
    adapted = f" with the adapter {args.adapter}" if args.adapter else ""
    print(
        f"acteng: serving {model.name}{adapted} on http://{args.host}:{args.port} (playground at /)"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _guard_detector(resolver: Any, name: str) -> Any:
    """The detector `--guard NAME` names, with an error in command-line terms: the server
    resolves names as a request does, and its own message points at the HTTP routes."""
    from acteng.bundled import bundled_files
    from acteng.errors import RequestError

    try:
        return resolver.detector(name, "--guard")
    except RequestError as exc:
        path = "/" in name or os.sep in name or name.endswith((".safetensors", ".gguf"))
        if exc.status != 404 and not path:
            raise
        problem = "the server takes names, not paths" if path else f"no detector named {name!r}"
        bundled = ", ".join(sorted(bundled_files()))
        raise ConfigError(
            f"--guard {name}: {problem} (bundled: {bundled}; the library at "
            f"{resolver.library.home} holds the rest); add a detector file to the library with "
            "`acteng vectors add NAME FILE` (--home for another library) and pass --guard NAME"
        ) from exc
