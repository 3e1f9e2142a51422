"""``acteng train circuit-breaker`` / ``acteng train rmu``: representation training into a
PEFT adapter folder; ``acteng train merge``: an adapter merged into its base model, saved as a
model folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from acteng.cli.common import add_model_args, print_json
from acteng.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train weights with losses on activations (circuit breakers, RMU unlearning); "
        "merge adapters",
        description="Representation training. The result is a PEFT adapter folder with "
        "acteng's provenance (acteng_training.json), loadable with --adapter by every "
        "command, by acteng serve and by transformers + PEFT.",
    )
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    rmu = methods.add_parser(
        "rmu",
        help="unlearn a knowledge domain (RMU, Li et al. 2024)",
        description="RMU: push the activations at one layer towards a fixed random direction "
        "on the forget texts, hold them on the retain texts; only the MLP output projections "
        "of the two blocks below and the layer itself change. Checkpoints every "
        "--checkpoint-every steps; Ctrl-C keeps the adapter of the last finished step.",
    )
    rmu.add_argument(
        "--forget",
        required=True,
        help='texts to unlearn: a bundled domain name, a .jsonl of {"text": ...} rows '
        "(train split used) or a .txt file, one text a line",
    )
    rmu.add_argument("--out", required=True, help="adapter folder to write")
    rmu.add_argument(
        "--retain",
        default=None,
        help="texts to keep (same forms; default: the bundled neutral paragraphs and "
        "general-knowledge questions, train splits)",
    )
    rmu.add_argument(
        "--layer", type=int, default=None, help="RMU layer (default: 30 %% of the depth)"
    )
    rmu.add_argument("--steps", type=int, default=200)
    rmu.add_argument("--lr", type=float, default=1e-3)
    rmu.add_argument("--alpha", type=float, default=100.0, help="weight of the retain loss")
    rmu.add_argument(
        "--beta",
        type=float,
        default=3.0,
        help="target distance: c = beta x the median distance of retain activations from "
        "their mean at the layer",
    )
    rmu.add_argument("--batch-size", type=int, default=4)
    rmu.add_argument("--max-tokens", type=int, default=64, help="tokens kept of each text")
    rmu.add_argument("--seed", type=int, default=0)
    rmu.add_argument("--checkpoint-every", type=int, default=50)
    rmu.add_argument("--force", action="store_true", help="replace an existing --out folder")
    rmu.add_argument("--json", action="store_true")
    add_model_args(rmu)
    rmu.set_defaults(run=run_train_rmu)
    cb = methods.add_parser(
        "circuit-breaker",
        help="make the model's representations of harmful content useless to it "
        "(circuit breakers, Zou et al. 2024)",
        description="Circuit breakers (representation rerouting): a LoRA adapter on the "
        "blocks up to the highest target layer, trained to turn the representations of "
        "harmful requests and the model's own compliant answers away from the frozen "
        "model's (ReLU of the cosine) while holding those of harmless look-alikes and "
        "refusals (L2). Data defaults to the team's train splits; every request gets the "
        "model's own answer first (cached). Checkpoints every --checkpoint-every steps; "
        "Ctrl-C keeps the adapter of the last finished step.",
    )
    cb.add_argument("--out", required=True, help="adapter folder to write")
    cb.add_argument(
        "--harmful",
        default=None,
        help='requests to break on: .txt (one a line) or .jsonl of {"prompt": ...} or '
        '{"messages": [...]} rows (default: the bundled harmful and wrapped requests)',
    )
    cb.add_argument(
        "--retain",
        default=None,
        help="requests to keep answering, same forms (default: the bundled harmless "
        "look-alikes, plain and wrapped)",
    )
    cb.add_argument(
        "--target-layers",
        default=None,
        help="layers to reroute at, as --layers reads them: '9,18', '8-10', -1 (default: "
        "30 %% and 60 %% of the depth)",
    )
    cb.add_argument("--steps", type=int, default=150)
    cb.add_argument("--lr", type=float, default=3e-3)
    cb.add_argument("--alpha", type=float, default=10.0, help="loss scale (the paper's alpha)")
    cb.add_argument(
        "--retain-weight",
        type=float,
        default=10.0,
        help="weight of the retain loss against rerouting (relative L2 distances)",
    )
    cb.add_argument("--rank", type=int, default=16, help="LoRA rank")
    cb.add_argument("--batch-size", type=int, default=4)
    cb.add_argument("--examples", type=int, default=256, help="requests used of each set")
    cb.add_argument(
        "--text-share",
        type=float,
        default=None,
        help="share of each retain batch taken from plain retain texts (default: 0.5 when "
        "paired, else in proportion to their number)",
    )
    cb.add_argument(
        "--answer-only-share",
        type=float,
        default=0.0,
        help="share of harmful examples trained on their answer alone, the request dropped "
        "(the paper's Llama-3 recipe uses 0.5; default 0)",
    )
    cb.add_argument(
        "--paired",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the i-th harmful and i-th retain request are a minimal pair (same wording but "
        "for the intent): each step holds the look-alikes of its harmful rows in a retain "
        "term of their own (default: paired on the bundled sets, which are; unpaired when "
        "you give --harmful or --retain)",
    )
    cb.add_argument("--answer-tokens", type=int, default=32, help="length of the own answers")
    cb.add_argument("--max-tokens", type=int, default=128, help="tokens kept of each example")
    cb.add_argument("--seed", type=int, default=0)
    cb.add_argument("--checkpoint-every", type=int, default=50)
    cb.add_argument("--force", action="store_true", help="replace an existing --out folder")
    cb.add_argument("--json", action="store_true")
    add_model_args(cb)
    cb.set_defaults(run=run_train_circuit_breaker)
    merge = methods.add_parser(
        "merge",
        help="merge an adapter into its base model (a safetensors model folder)",
        description="Merge a PEFT adapter folder (one acteng trained, or any LoRA adapter of "
        "the model) into the base model's weights and save a transformers model folder "
        "(config.json, model.safetensors, tokenizer, acteng_merged.json) that loads without "
        "PEFT: --model for acteng, vLLM or transformers.",
    )
    merge.add_argument("--adapter", required=True, help="PEFT adapter folder")
    merge.add_argument("--out", required=True, help="model folder to write")
    merge.add_argument(
        "--model",
        default=None,
        help="the base model (bundled name, .gguf, folder; default: the embedded model)",
    )
    merge.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    merge.add_argument("--force", action="store_true", help="replace an existing model folder")
    merge.add_argument("--json", action="store_true")
    merge.set_defaults(run=run_train_merge)


def run_train_merge(args: argparse.Namespace) -> int:
    from acteng.training.merge import merge_adapter

    if not Path(args.adapter, "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {args.adapter} has no adapter_config.json: not a PEFT folder")
    out = merge_adapter(
        args.adapter, args.out, source=args.model, dtype=args.dtype, force=args.force
    )
    if args.json:
        print_json({"model": str(out), "adapter": args.adapter})
    else:
        print(f"merged model written to {out}; load it with --model {out}")
    return 0


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not (out / "adapter_config.json").is_file():
        raise ConfigError(
            f"--out {out} exists and is not an adapter folder; choose another path (--force "
            "replaces only an adapter folder)"
        )
    if out.exists() and not force:
        raise ConfigError(f"--out {out} exists; choose another folder or add --force")


def run_train_circuit_breaker(args: argparse.Namespace) -> int:
    from acteng.cli.common import load_model_from_args
    from acteng.training.circuit_breaker import train_circuit_breaker
    from acteng.training.data import load_conversations

    out = Path(args.out)
    _check_out(out, args.force)
    # the data is read before the model loads, so a bad file fails at once
    harmful = None if args.harmful is None else load_conversations(args.harmful, what="--harmful")
    retain = None if args.retain is None else load_conversations(args.retain, what="--retain")
    model = load_model_from_args(args)
    result = train_circuit_breaker(
        model,
        out,
        harmful=harmful,
        retain=retain,
        target_layers=args.target_layers,  # read by parse_layers, as every --layers is
        steps=args.steps,
        lr=args.lr,
        alpha=args.alpha,
        retain_weight=args.retain_weight,
        rank=args.rank,
        batch_size=args.batch_size,
        examples=args.examples,
        text_share=args.text_share,
        answer_only_share=args.answer_only_share,
        paired=args.paired,
        answer_tokens=args.answer_tokens,
        max_tokens=args.max_tokens,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        progress=_show_progress(args),
    )
    last = result.losses[-1]
    summary = {
        "adapter": str(result.adapter),
        "target_layers": list(result.target_layers),
        "steps": result.steps,
        "reroute_loss": last["reroute"],
        "retain_loss": last["retain"],
        "rerouted": result.rerouted,
        "seconds": round(last["seconds"], 1),
    }
    # an adapter that never rerouted is warned about by the trainer (logged)
    return _finish(args, summary, f"target layers {list(result.target_layers)}")


def run_train_rmu(args: argparse.Namespace) -> int:
    from acteng.cli.common import load_model_from_args
    from acteng.training.data import load_texts
    from acteng.training.rmu import train_rmu

    out = Path(args.out)
    _check_out(out, args.force)
    # the data is read before the model loads, so a bad file fails at once
    load_texts(args.forget, split="train", what="--forget")
    if args.retain is not None:
        load_texts(args.retain, split="train", what="--retain")
    model = load_model_from_args(args)
    result = train_rmu(
        model,
        args.forget,
        out,
        retain=args.retain,
        layer=args.layer,
        steps=args.steps,
        lr=args.lr,
        alpha=args.alpha,
        beta=args.beta,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        progress=_show_progress(args),
    )
    last = result.losses[-1]
    summary = {
        "adapter": str(result.adapter),
        "layer": result.layer,
        "update_layers": list(result.update_layers),
        "steps": result.steps,
        "forget_loss": last["forget"],
        "retain_loss": last["retain"],
        "seconds": round(last["seconds"], 1),
    }
    return _finish(
        args, summary, f"layer {result.layer}, blocks {list(result.update_layers)} edited"
    )


def _finish(args: argparse.Namespace, summary: dict[str, Any], what: str) -> int:
    """Print a trainer's summary: JSON, or one line saying where the adapter is."""
    if args.json:
        print_json(summary)
    else:
        print(
            f"adapter written to {summary['adapter']} ({what}, {summary['steps']} steps in "
            f"{summary['seconds']:.0f} s); use it with --adapter {summary['adapter']}"
        )
    return 0


def _show_progress(args: argparse.Namespace) -> bool:
    """Progress lines go to stderr, so they never mix with --json on stdout: shown on a
    terminal whatever the format (a run of minutes must not look hung), and in a log
    only without --json."""
    return sys.stderr.isatty() or not args.json
