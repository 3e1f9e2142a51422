"""``acteng serve``: the OpenAI-compatible server with per-request steering and a playground."""

from __future__ import annotations

import argparse
import ipaddress
import os
from typing import Any

from acteng.cli.common import add_model_args, parse_vector_arg
from acteng.errors import ConfigError, missing_extra

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
        "(needs acteng[vllm]; no monitor or guard)",
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


def run_serve(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_binding(args.host, api_key)
    try:
        import uvicorn

        from acteng.server.app import create_app
    except ImportError as exc:
        raise missing_extra(exc.name or "fastapi", "serve", purpose="acteng serve") from exc
    if args.engine == "vllm":
        from acteng.vllm_engine.engine import run

        return run(args, api_key)
    from acteng.cli.common import load_model_from_args
    from acteng.library import VectorLibrary
    from acteng.server.engine import Engine
    from acteng.server.requests import Limits, parse_guard
    from acteng.server.resolve import Resolver

    model = load_model_from_args(args)
    library = VectorLibrary(args.home)
    guard = default_guard(args)
    limits = Limits(max_tokens=args.max_tokens, context=args.context)
    if guard is not None:  # fail now, not on the first request
        parse_guard(None, guard, Resolver(model, library), limits)
    if args.replicas is not None:
        from acteng.server.replicas import serve_from_args

        return serve_from_args(args, model, api_key, guard)
    engine = Engine(
        model,
        slots=args.slots,
        context=args.context,
        max_queue=args.queue,
        fixed_batch=not args.no_fixed_batch,
    )
    app = create_app(engine, library=library, api_key=api_key, limits=limits, default_guard=guard)
    print(f"acteng: serving {model.name} on http://{args.host}:{args.port} (playground at /)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
