"""``acteng extract`` and ``acteng datasets``: build vectors, list bundled data."""

from __future__ import annotations

import argparse
import time
from typing import Any

from acteng.cli.common import (
    add_backend_args,
    add_model_args,
    backend_from_args,
    check_writable,
    layer_span,
    load_model_from_args,
    print_json,
)
from acteng.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "extract",
        help="build a steering vector from contrastive pairs",
        description="Build a steering vector from contrastive pairs; every "
        "layer comes from one pass over the data. With --diff-adapter, the vector is instead "
        "what an adapter changed: the adapted minus the base model's mean activation on the "
        "same texts (--prompts, or both sides of --pairs).",
    )
    p.add_argument("--pairs", default=None, help="JSONL/JSON file or bundled dataset name")
    p.add_argument(
        "--diff-adapter",
        default=None,
        metavar="DIR",
        help="extract the model-diff vector of this adapter folder (see above)",
    )
    p.add_argument(
        "--prompts",
        default=None,
        help="with --diff-adapter: texts to compare on (.txt, one a line, or .jsonl with 'text')",
    )
    p.add_argument(
        "--split",
        default="train",
        choices=["train", "test", "all"],
        help="which fixed split to use (default: train)",
    )
    p.add_argument("--method", default=None, help="actadd, mean_diff (default), pca or probe")
    p.add_argument("--layers", default="all", help="'all' (default), '12', '11-13', '5,7,9'")
    p.add_argument(
        "--position", default=None, help="last (default; mean with --diff-adapter), mean or answer"
    )
    p.add_argument("--normalize", default=None, choices=["unit"], help="scale each layer to 1")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, help="where to write the .safetensors vector")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_model_args(p)
    add_backend_args(p)
    p.set_defaults(run=run_extract)

    d = sub.add_parser(
        "datasets",
        help="list the bundled contrastive datasets",
        description="List the bundled contrastive datasets (pairs, kind, train split), or "
        "show one dataset's card: what it measures, its format, split and provenance.",
    )
    d.add_argument("name", nargs="?", help="show this dataset's card")
    d.add_argument("--json", action="store_true")
    d.set_defaults(run=run_datasets)


def run_extract(args: argparse.Namespace) -> int:
    from acteng.extraction import extract
    from acteng.pairs import load_pairs

    check_writable(args.out, "safetensors")
    if args.diff_adapter is not None:
        return _run_diff(args)
    if args.pairs is None:
        raise ConfigError("extract needs --pairs (or --diff-adapter DIR with --prompts)")
    if args.prompts is not None:
        raise ConfigError(
            "--prompts goes with --diff-adapter; contrastive extraction reads --pairs"
        )
    args.method = args.method or "mean_diff"
    backend = backend_from_args(args)
    pairs = load_pairs(args.pairs, split=args.split)
    model = load_model_from_args(args)
    start = time.perf_counter()
    vector = extract(
        model,
        pairs,
        method=args.method,
        layers=args.layers,
        position=args.position or "last",
        normalize=args.normalize,
        batch_size=args.batch_size,
        progress=True,
        backend=backend,
    )
    seconds = time.perf_counter() - start
    path = vector.save(args.out)
    summary = {
        "out": str(path),
        "method": args.method,
        "position": args.position or "last",
        "pairs": len(pairs),
        "dataset": pairs.name,
        "layers": list(vector.layers),
        "norms": {str(k): round(v, 4) for k, v in vector.norms().items()},
        "seconds": round(seconds, 3),
    }
    if args.json:
        print_json(summary)
    else:
        print(
            f"wrote {path}: {args.method} over {len(pairs)} pairs of {pairs.name!r}, "
            f"layers {layer_span(vector.layers)} ({len(vector.layers)}), "
            f"{seconds:.1f} s"
        )
    return 0


def _run_diff(args: argparse.Namespace) -> int:
    """``extract --diff-adapter``: the model-diff vector of an adapter (`diff_vector`)."""
    from acteng.pairs import load_pairs
    from acteng.training.data import load_texts
    from acteng.training.diff import diff_vector

    if args.adapter is not None:
        raise ConfigError("--diff-adapter compares against the base model; drop --adapter")
    if args.method is not None:
        raise ConfigError(
            "--diff-adapter makes one kind of vector, the mean activation difference between "
            "the adapted and the base model; drop --method"
        )
    if args.prompts is not None:
        texts = load_texts(args.prompts, what="--prompts")
    elif args.pairs is not None:
        pairs = load_pairs(args.pairs, split=args.split)
        texts = [p.positive for p in pairs] + [p.negative for p in pairs]
    else:
        raise ConfigError("--diff-adapter needs texts to compare on: --prompts FILE or --pairs")
    model = load_model_from_args(args)
    start = time.perf_counter()
    vector = diff_vector(
        model,
        args.diff_adapter,
        texts,
        layers=args.layers,
        position=args.position or "mean",
        batch_size=args.batch_size,
    )
    seconds = time.perf_counter() - start
    path = vector.save(args.out)
    norms = vector.norms()
    top = max(norms, key=norms.__getitem__)
    summary = {
        "out": str(path),
        "method": "diff_adapter",
        "adapter": args.diff_adapter,
        "texts": len(texts),
        "layers": list(vector.layers),
        "norms": {str(k): round(v, 4) for k, v in norms.items()},
        "seconds": round(seconds, 3),
    }
    if args.json:
        print_json(summary)
    else:
        print(
            f"wrote {path}: what {args.diff_adapter} changed, on {len(texts)} texts; largest "
            f"at layer {top} (norm {norms[top]:.3g}), {seconds:.1f} s"
        )
    return 0


def run_datasets(args: argparse.Namespace) -> int:
    from acteng.pairs import dataset_card, list_datasets, load_pairs

    if args.name:
        card = dataset_card(args.name)
        if args.json:
            pairs = load_pairs(args.name)
            print_json({"name": args.name, "pairs": len(pairs), "card": card})
        else:
            print(card)
        return 0
    rows = []
    for name in list_datasets():
        pairs = load_pairs(name)
        rows.append(
            {
                "name": name,
                "pairs": len(pairs),
                "train": sum(1 for p in pairs if (p.split or "train") == "train"),
                "ab": any(p.ab for p in pairs),
            }
        )
    if args.json:
        print_json(rows)
    else:
        for r in rows:
            kind = "A/B" if r["ab"] else "pairs"
            print(f"{r['name']:<18} {r['pairs']:>4} {kind:<5} ({r['train']} train)")
    return 0
