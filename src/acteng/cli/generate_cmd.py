"""``acteng generate`` (one-shot, with ``--compare``) and ``acteng chat`` (interactive)."""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TextIO

from acteng.cli.common import (
    add_model_args,
    build_specs,
    layer_span,
    load_model_from_args,
    parse_vector_arg,
    print_json,
    settle_guard_options,
    warn_other_model,
)
from acteng.errors import ActengError, ConfigError

if TYPE_CHECKING:
    from acteng.steering.spec import SteeringSpec


def _add_steering_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("steering")
    g.add_argument(
        "--vector",
        action="append",
        default=[],
        metavar="PATH[:COEF]",
        help="steering vector file and coefficient (repeatable)",
    )
    g.add_argument(
        "--layers", default=None, help="steer only these layers (default: the vector's own)"
    )
    g.add_argument(
        "--positions",
        default="all",
        help="all (default), prompt, generated or a window 'start:end'",
    )
    g.add_argument("--mode", default="add", help="add (default), ablate or clamp")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--system", default=None, help="system prompt")
    g.add_argument(
        "--no-chat", action="store_true", help="feed the prompt as raw text instead of a chat turn"
    )


def register(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text, steered or not",
        description="Generate a completion; with --compare, print the "
        "unsteered and steered completions side by side.",
    )
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--compare", action="store_true", help="also generate unsteered")
    p.add_argument("--json", action="store_true")
    _add_steering_args(p)
    g = p.add_argument_group("guard")
    g.add_argument(
        "--guard",
        action="append",
        metavar="DETECTOR",
        help="detector file or name (e.g. harmful_request); repeat to watch several "
        "(the prompt fires when any does)",
    )
    g.add_argument("--policy", default=None, help="flag (default), block, steer or stop")
    g.add_argument(
        "--check", default=None, help="where to check: prompt (default), generation, both"
    )
    g.add_argument(
        "--counter",
        action="append",
        default=[],
        metavar="PATH[:COEF]",
        help="counter-steering vector for --policy steer (repeatable; its own layers)",
    )
    g.add_argument("--threshold", type=float, help="override the detector's threshold")
    g.add_argument(
        "--generation-threshold",
        type=float,
        help="threshold of the running score while generating (default: --threshold); "
        "calibrate it with acteng.guard.calibrate_generation",
    )
    add_model_args(p)
    p.set_defaults(run=run_generate)

    c = sub.add_parser(
        "chat",
        help="interactive steered chat (type /help inside)",
        description="Chat with the model in the terminal, steered by --vector NAME:COEF; "
        "/coef, /vector, /clear, /off, /on and /reset change it as you go (/help lists them).",
    )
    _add_steering_args(c)
    add_model_args(c)
    c.set_defaults(run=run_chat)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "system": args.system,
        "chat": not args.no_chat,
    }


def side_by_side(left: str, right: str, titles: tuple[str, str], width: int | None = None) -> str:
    """Two texts in two wrapped columns."""
    total = width or shutil.get_terminal_size((120, 20)).columns
    col = max(20, (total - 3) // 2)
    a = [titles[0], "-" * len(titles[0]), *textwrap.wrap(left.strip() or "(empty)", col)]
    b = [titles[1], "-" * len(titles[1]), *textwrap.wrap(right.strip() or "(empty)", col)]
    rows = max(len(a), len(b))
    a += [""] * (rows - len(a))
    b += [""] * (rows - len(b))
    return "\n".join(f"{x:<{col}} | {y}" for x, y in zip(a, b, strict=True))


def run_generate(args: argparse.Namespace) -> int:
    from acteng.generation import generate

    settle_guard_options(args)
    if args.compare and not args.vector and not args.guard:
        raise ConfigError(
            "--compare sets answers with and without steering, and no --vector is given; to "
            "compare an adapter, run once with and once without --adapter"
        )
    model = load_model_from_args(args)
    specs = build_specs(
        model, args.vector, layers=args.layers, positions=args.positions, mode=args.mode
    )
    if args.guard:
        return _run_guarded(args, model, specs)
    options = _options(args)
    steered = generate(model, args.prompt, specs or None, **options)
    plain = generate(model, args.prompt, **options) if args.compare and specs else None
    if args.json:
        rows = []
        for i, prompt in enumerate(args.prompt):
            row = {"prompt": prompt, "steered" if specs else "text": steered[i]}
            if plain is not None:
                row["unsteered"] = plain[i]
            rows.append(row)
        print_json({"steering": [_describe(s) for s in specs], "results": rows})
        return 0
    label = ", ".join(_describe_short(s) for s in specs) or "unsteered"
    for i, prompt in enumerate(args.prompt):
        print(f"> {prompt}\n")
        if plain is not None:
            print(side_by_side(plain[i], steered[i], ("unsteered", f"steered ({label})")))
        else:
            print(steered[i].strip())
        print()
    return 0


def _run_guarded(args: argparse.Namespace, model: Any, specs: list[Any]) -> int:
    from acteng.detectors import load_detector
    from acteng.guard import Guard, guarded_generate

    if args.no_chat:
        raise ConfigError("the guard reads chat prompts; drop --no-chat")
    if args.compare:
        raise ConfigError(
            "--compare is not offered with --guard (the verdict is per prompt); run once "
            "without --guard for the unguarded answer"
        )
    if args.policy == "steer" and not args.counter:
        raise ConfigError("--policy steer needs counter-steering: add --counter NAME:COEF "
                          "(e.g. --counter refusal:1)")  # fmt: skip
    if args.policy != "steer" and args.counter:
        raise ConfigError("--counter is only used by --policy steer")
    counter = build_specs(model, args.counter, layers=None, positions="all", mode="add")
    detectors = tuple(load_detector(name, model=model) for name in args.guard)
    for name, detector in zip(args.guard, detectors, strict=True):
        warn_other_model(name, detector, model)
    guard = Guard(
        detectors,
        policy=args.policy,
        check=args.check,
        steering=tuple(counter),
        threshold=args.threshold,
        generation_threshold=args.generation_threshold,
    )
    names = guard.names()
    results = guarded_generate(
        model,
        args.prompt,
        guard,
        specs or None,
        max_new_tokens=args.max_new_tokens,
        system=args.system,
        temperature=args.temperature,
        seed=args.seed,
    )
    if args.json:
        rows = []
        for prompt, result in zip(args.prompt, results, strict=True):
            row = {"prompt": prompt, **result.to_json()}
            row["fired_by"] = None if result.fired_by is None else names[result.fired_by]
            rows.append(row)
        thresholds = dict(zip(names, guard.limits, strict=True))
        summary = {"threshold": guard.limit, "thresholds": thresholds, "policy": guard.policy}
        print_json({**summary, "detectors": list(names), "results": rows})
        return 0
    for prompt, result in zip(args.prompt, results, strict=True):
        by = "" if result.fired_by is None or len(names) == 1 else f" ({names[result.fired_by]})"
        verdict = (
            f"fired on the {result.fired_on}{by} -> {result.action}" if result.flagged else "passed"
        )
        if len(names) > 1 and result.prompt_scores:
            pairs = zip(names, result.prompt_scores, guard.limits, strict=True)
            score = "; " + ", ".join(f"{n} {x:+.3f} (threshold {t:+.3f})" for n, x, t in pairs)
            print(f"> {prompt}\n[guard: {verdict}{score}]\n")
        else:
            score = (
                "" if result.prompt_score is None else f", prompt score {result.prompt_score:+.3f}"
            )
            print(f"> {prompt}\n[guard: {verdict}{score}; threshold {guard.limit:+.3f}]\n")
        print((result.text.strip() or "(no text)") + "\n")
    return 0


def _describe(spec: SteeringSpec) -> dict[str, Any]:
    """The spec's JSON form (`SteeringSpec.to_json`) plus how its vector was made."""
    return {**spec.to_json(), "method": spec.vector.metadata.get("method")}


def _describe_short(spec: Any) -> str:
    return f"{spec.mode} {spec.coefficient:g} @ L{layer_span(spec.active_layers)}"


CHAT_HELP = """commands:
  /coef C          set the coefficient of every vector
  /vector PATH[:C] add a vector
  /clear           drop all vectors       /off, /on   pause or resume steering
  /show            list active vectors    /reset      forget the conversation
  /quit            leave"""


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    from acteng.generation import generate

    source = stdin or sys.stdin
    model = load_model_from_args(args)
    specs = build_specs(
        model, args.vector, layers=args.layers, positions=args.positions, mode=args.mode
    )
    enabled = True
    history: list[dict[str, str]] = []
    options = _options(args)
    options.pop("chat")
    print(f"acteng chat on {model.name}; /help for commands", flush=True)
    while True:
        print("you> ", end="", flush=True)
        line = source.readline()
        if not line:
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            try:
                if command == "/quit":
                    return 0
                if command == "/help":
                    print(CHAT_HELP)
                elif command == "/coef":
                    try:
                        _, coefficient = parse_vector_arg(f"x:{rest.strip()}")
                    except ConfigError:
                        raise ConfigError(
                            f"/coef {rest.strip()!r}: give a number, e.g. /coef 4"
                        ) from None
                    specs = [replace(s, coefficient=coefficient) for s in specs]
                    print(f"coefficient set to {coefficient:g} on {len(specs)} vector(s)")
                elif command == "/vector":
                    specs += build_specs(
                        model,
                        [rest.strip()],
                        layers=args.layers,
                        positions=args.positions,
                        mode=args.mode,
                    )
                    print(f"added: {_describe_short(specs[-1])}")
                elif command == "/clear":
                    specs = []
                    print("no vectors")
                elif command in ("/off", "/on"):
                    enabled = command == "/on"
                    print("steering " + ("on" if enabled else "off"))
                elif command == "/show":
                    print("\n".join(_describe_short(s) for s in specs) or "no vectors")
                elif command == "/reset":
                    history = []
                    print("conversation cleared")
                else:
                    print(f"unknown command {command}; /help lists them")
            except ActengError as exc:
                print(f"error: {exc}")
            continue
        history.append({"role": "user", "content": line})
        active = specs if (enabled and specs) else None
        reply = generate(model, [history], active, **options)[0].strip()
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
