"""The ``acteng`` command line: a thin layer over the library, one subcommand per verb.

Errors print one line (problem, value, fix) and exit with status 2; ``--debug`` shows the
traceback. Heavy imports happen inside the subcommands so ``acteng --help`` is instant.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from acteng import __version__
from acteng.cli import (
    analyze_cmd,
    calibrate_cmd,
    demo_cmd,
    detect_cmd,
    eval_cmd,
    extract_cmd,
    generate_cmd,
    monitor_cmd,
    serve_cmd,
    sweep_cmd,
    train_cmd,
    train_detector_cmd,
    vectors_cmd,
)
from acteng.errors import ActengError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser that takes option names only as written: argparse's default
    reads a prefix as the option it starts (`export --model` as `--model-hint`, `--mode`
    as `--model` where a command has no `--mode`), which silently misreads a mistyped or
    misplaced option. Subcommand parsers are of the same class, so the rule holds in every
    command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """argparse's error, with the option meant where an unknown one is near one of the
        command's own (`--layer` for `--layers`, once taken as an abbreviation)."""
        if message.startswith("unrecognized arguments:"):
            known = sorted(_options(_command_parser(self, getattr(self, "argv", []))))
            hints = []
            for token in message.split(":", 1)[1].split():
                name = token.split("=")[0]
                if not name.startswith("--"):
                    continue
                close = [o for o in known if o.startswith(name)] or difflib.get_close_matches(
                    name, known, n=1, cutoff=0.8
                )
                if close:
                    hints.append(f"{name}: did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the (sub)command that `argv` names, e.g. ``train rmu``."""
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if word.startswith("-") or not subs:
            continue
        if word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return parser


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """The long options of `parser` itself."""
    return {o for action in parser._actions for o in action.option_strings if o.startswith("--")}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="acteng",
        description="Activation engineering: make, apply and measure steering vectors.",
    )
    parser.add_argument("--version", action="version", version=f"acteng {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks on errors (also after the command)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    extract_cmd.register(sub)
    generate_cmd.register(sub)
    vectors_cmd.register(sub)
    monitor_cmd.register(sub)
    detect_cmd.register(sub)
    train_detector_cmd.register(sub)
    calibrate_cmd.register(sub)
    train_cmd.register(sub)
    eval_cmd.register(sub)
    analyze_cmd.register(sub)
    sweep_cmd.register(sub)
    demo_cmd.register(sub)
    serve_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``acteng`` script; returns the exit status."""
    parser = build_parser()
    words = _debug_first(sys.argv[1:] if argv is None else list(argv))
    parser.argv = words  # type: ignore[attr-defined]  # for the hints in _Parser.error
    args = parser.parse_args(words)
    # acteng's own warnings (a cut that drops answers, a run that never rerouted) reach
    # stderr through a handler of the package's own, so they show even where the root
    # logger is configured already (an application calling `main`, pytest)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("acteng: %(message)s"))
    package = logging.getLogger("acteng")
    package.addHandler(handler)
    package.setLevel(logging.DEBUG if args.debug else logging.WARNING)
    try:
        return _run(args)
    finally:
        package.removeHandler(handler)
        package.setLevel(logging.NOTSET)


def _debug_first(argv: list[str]) -> list[str]:
    """`--debug` is an option of ``acteng`` itself, but it is natural to add it at the end
    of a command that failed: wherever it stands before a ``--``, it counts."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return argv
    return ["--debug"] + [a for a in argv[:end] if a != "--debug"] + argv[end:]


def _run(args: argparse.Namespace) -> int:
    """Run the parsed subcommand, turning expected failures into one-line errors."""
    try:
        status: int = args.run(args)
        sys.stdout.flush()  # here, so a closed pipe is caught below rather than at exit
        return status
    except ActengError as exc:
        if args.debug:
            raise
        print(f"acteng {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `acteng ... | head`: the reader has what it wanted
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a path the user gave cannot be read or written
        if args.debug:
            raise
        print(f"acteng {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("acteng: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
