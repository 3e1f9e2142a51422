"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from acteng.errors import ConfigError

log = logging.getLogger("acteng.cli")

if TYPE_CHECKING:
    from acteng.backends import BackendChoice
    from acteng.models import Model
    from acteng.steering.spec import SteeringSpec
    from acteng.vectors import SteeringVector


ONCE_HINTS = {
    "adapter": " (to stack two adapters, merge the first into a model folder with `acteng "
    "train merge` and pass that as --model)"
}


class Once(argparse.Action):
    """An option that may be given once: argparse keeps the last of repeated values, so
    `--adapter A --adapter B` silently loaded B alone."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            hint = ONCE_HINTS.get(self.dest, "")
            parser.error(f"{option} is given twice; give it once{hint}")
        setattr(namespace, self.dest, values)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        action=Once,
        default=None,
        help="bundled name, .gguf file, transformers folder or hub id "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    group.add_argument(
        "--adapter",
        action=Once,
        default=None,
        help="PEFT/LoRA adapter folder to apply (one)",
    )
    group.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    group.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backend")
    group.add_argument(
        "--backend",
        default="local",
        choices=["local", "ray"],
        help="local (default) or ray: run on a Ray cluster (needs acteng[ray])",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to attach to (default $RAY_ADDRESS, else a local one); implies "
        "--backend ray",
    )


def backend_from_args(args: argparse.Namespace) -> BackendChoice:
    """The backend the flags ask for, checked now (a missing Ray fails before any work)."""
    from acteng.backends import resolve_backend
    from acteng.backends.ray import RayBackend

    if args.backend == "local" and args.ray_address is None:
        return "local"
    backend = RayBackend(address=args.ray_address)
    resolve_backend(backend)
    return backend


def load_model_from_args(args: argparse.Namespace) -> Model:
    from transformers.utils import logging as hf_logging

    from acteng.models import load_model

    # the CLI has its own progress output; transformers leaves this function unannotated
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    return load_model(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device)


def parse_vector_arg(text: str) -> tuple[str, float]:
    """``PATH[:COEF]`` -> (path, coefficient); the coefficient defaults to 1."""
    path, sep, coef = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return path, float(coef)
    except ValueError:
        raise ConfigError(
            f"cannot read coefficient {coef!r} in --vector {text!r}; write PATH:COEF, "
            "e.g. v.safetensors:4"
        ) from None


def build_specs(
    model: Model, vectors: list[str], *, layers: str | None, positions: str, mode: str
) -> list[SteeringSpec]:
    """``--vector PATH[:COEF]`` flags (with ``--layers``, ``--positions``, ``--mode``) as
    specs: each becomes a steering item read by `SteeringSpec.from_json`, exactly as an
    HTTP ``steering[i]`` item is, so flags and requests accept the same values."""
    from acteng.library import load_vector
    from acteng.steering.spec import SteeringSpec

    def lookup(name: str) -> SteeringVector:
        return load_vector(name, model=model)

    specs = []
    for i, text in enumerate(vectors):
        path, coefficient = parse_vector_arg(text)
        item: dict[str, Any] = {
            "vector": path,
            "coefficient": coefficient,
            "positions": positions,
            "mode": mode,
        }
        if layers:
            item["layers"] = layers
        specs.append(SteeringSpec.from_json(item, lookup, model, where=f"steering[{i}]"))
    return specs


# how each kind of file acteng writes begins: a safetensors header length, then its JSON
_FILE_STARTS = {
    "safetensors": lambda head: head[8:9] == b"{",
    "gguf": lambda head: head[:4] == b"GGUF",
}


def check_writable(path: str, kind: str | None = None) -> None:
    """Fail before any long work when an output file cannot be written, or when it exists
    and is not a `kind` file (``"safetensors"``, ``"gguf"``): a vector may replace an older
    vector, never a file of another kind (a mistyped --out once overwrote a notes file)."""
    import os
    from pathlib import Path

    if kind is not None and Path(path).is_file():
        with open(path, "rb") as existing:
            head = existing.read(16)
            if head and not _FILE_STARTS[kind](head):  # empty (mktemp) is free to use
                raise ConfigError(
                    f"{path} exists and is not a {kind} file; acteng replaces only a file "
                    "of the kind it writes: choose another path, or move that file first"
                )

    folder = Path(path).expanduser().resolve().parent
    # Missing folders are made to prove they can be, then removed again: a command that
    # fails on its input later must leave nothing behind (the writers make them for real).
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the folder for {path!r} ({exc}); choose another path"
        ) from exc
    finally:
        for made in missing:
            with contextlib.suppress(OSError):
                made.rmdir()
    if not writable or Path(path).is_dir():
        raise ConfigError(
            f"cannot write {path!r} (folder not writable or path is a folder); choose another path"
        )


def whole_number(minimum: int) -> Any:
    """An argparse type: a whole number of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def layer_span(layers: Any) -> str:
    """Layers written short: runs of consecutive ones as ``a-b`` ("6-22", "0,8", "5,7,9")."""
    runs: list[list[int]] = []
    for layer in sorted(int(x) for x in layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def print_json(payload: Any) -> None:
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


# the options that tell a guard how to act, by their argparse names
GUARD_OPTIONS = {
    "policy": "--policy",
    "check": "--check",
    "counter": "--counter",
    "threshold": "--threshold",
    "generation_threshold": "--generation-threshold",
}


def settle_guard_options(args: argparse.Namespace) -> None:
    """Refuse guard options given without ``--guard`` (they were ignored: a server started
    with ``--policy block`` alone guarded nothing and said so nowhere), fill in the
    defaults (policy flag, check prompt), and warn where the answer is checked at the
    prompt's threshold, which its running score, on another scale, rarely reaches."""
    given = [f for name, f in GUARD_OPTIONS.items() if getattr(args, name, None) not in (None, [])]
    if given and not args.guard:
        raise ConfigError(
            f"{', '.join(given[:-1]) + ' and ' if len(given) > 1 else ''}{given[-1]} "
            f"set{'s' if len(given) == 1 else ''} how a guard acts, but "
            "no guard is on: add --guard DETECTOR (e.g. --guard harmful_request)"
        )
    args.policy, args.check = args.policy or "flag", args.check or "prompt"
    if args.guard and args.check != "prompt" and args.generation_threshold is None:
        log.warning(
            "--check %s without --generation-threshold checks the answer's running score "
            "at the prompt threshold, which answers rarely reach (another scale): set one "
            "that flags few benign answers (acteng.guard.calibrate_generation finds it)",
            args.check,
        )


def warn_other_model(name: str, detector: Any, model: Model) -> None:
    """Warn when detector `name` was made on another model of the same shape: the width and
    depth checks pass (SmolLM2-135M base and instruct share both), but its scores and
    threshold were set on that model's activations. An adapter on either side is ignored
    (a guard on a circuit-broken model uses the base model's detector by design)."""
    made_for = detector.directions.metadata.get("model")
    if not isinstance(made_for, dict):
        return
    theirs = str(made_for.get("hash") or "").partition("+adapter:")[0]
    ours = model.content_hash.partition("+adapter:")[0]
    # a config hash moves with the load path, dtype and library version: only hashes of
    # the weights themselves (GGUF files) tell two models apart
    if theirs.startswith("config-") or ours.startswith("config-"):
        return
    if theirs and theirs != ours:
        log.warning(
            "the detector %s was made on %r, not on %r (the same shape, other weights): its "
            "scores and threshold may not hold here; recalibrate it on this model's benign "
            "traffic (acteng calibrate --detector %s --model ...)",
            name, made_for.get("name"), model.name, name,
        )  # fmt: skip
