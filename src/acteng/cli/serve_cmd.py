"""``acteng serve``: the OpenAI-compatible server with per-request steering and a playground."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acteng.cli.common import add_model_args, parse_vector_arg
from acteng.errors import ConfigError, missing_extra

if TYPE_CHECKING:
    from acteng.server.settings import ServeSettings

API_KEY_ENV = "ACTENG_API_KEY"


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
    g = p.add_argument_group("default guard (a request may change or turn it off)")
    g.add_argument("--guard", default=None, help="detector name for every request")
    g.add_argument("--policy", default="flag", help="flag | block | steer | stop")
    g.add_argument("--check", default="prompt", help="prompt | generation | both")
    g.add_argument("--counter", action="append", default=[], help="NAME:C counter-steering")
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


def default_guard(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.guard is None:
        return None
    counter = []
    for text in args.counter:
        name, coefficient = parse_vector_arg(text)
        counter.append({"vector": name, "coefficient": coefficient})
    guard: dict[str, Any] = {"detector": args.guard, "policy": args.policy, "check": args.check}
    if counter:
        guard["counter"] = counter
    return guard


def serve_settings(args: argparse.Namespace, api_key: str | None) -> ServeSettings:
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
        guard=default_guard(args),
    )


def run_serve(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_binding(args.host, api_key)
    try:
        import uvicorn

        from acteng.server.app import create_app
    except ImportError as exc:
        raise missing_extra(exc.name or "fastapi", "serve", purpose="acteng serve") from exc
    from acteng.cli.common import load_model_from_args

    settings = serve_settings(args, api_key)
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
    if settings.guard is not None:  # fail now, not on the first request
        parse_guard(None, settings.guard, Resolver(model, library), settings.limits)
    if args.replicas is not None:
        from acteng.server.replicas import run_replicas

        return run_replicas(model, args.replicas, args.host, args.port, settings)
    engine = Engine(
        model,
        slots=settings.slots,
        context=settings.context,
        max_queue=settings.max_queue,
        fixed_batch=settings.fixed_batch,
    )
    app = create_app(
        engine,
        library=library,
        api_key=api_key,
        limits=settings.limits,
        default_guard=settings.guard,
    )
    print(f"acteng: serving {model.name} on http://{args.host}:{args.port} (playground at /)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
