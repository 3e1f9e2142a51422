"""``acteng vectors`` (the library), ``acteng export`` and ``acteng import`` (GGUF)."""

from __future__ import annotations

import argparse
from typing import Any

from acteng.cli.common import add_model_args, check_writable, layer_span, print_json


def register(sub: Any) -> None:
    v = sub.add_parser(
        "vectors",
        help="the vector library ($ACTENG_HOME)",
        description="Keep, find and share named vectors with provenance.",
    )
    v.add_argument(
        "--home",
        default=None,
        help="library folder (default: $ACTENG_HOME or the platform's user data folder)",
    )
    vsub = v.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = vsub.add_parser("add", help="store a vector file under a name")
    add.add_argument("name")
    add.add_argument("file")
    add.add_argument("--tag", action="append", default=[], help="tag (repeatable)")
    add.add_argument("--force", action="store_true", help="replace an existing name")
    add.add_argument("--json", action="store_true")
    ls = vsub.add_parser("list", help="list stored vectors")
    ls.add_argument("--tag", default=None)
    ls.add_argument("--json", action="store_true")
    show = vsub.add_parser("show", help="metadata and evaluation card of one vector")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    rm = vsub.add_parser("rm", help="remove a vector")
    rm.add_argument("name")
    ren = vsub.add_parser("rename", help="rename a vector")
    ren.add_argument("old")
    ren.add_argument("new")
    v.set_defaults(run=run_vectors)

    exp = sub.add_parser("export", help="write a vector as a llama.cpp GGUF control vector")
    exp.add_argument("vector", help=".safetensors file or library name")
    exp.add_argument("out", help="output .gguf file")
    exp.add_argument(
        "--model-hint",
        default=None,
        help="controlvector.model_hint (default: the vector's model family)",
    )
    exp.set_defaults(run=run_export)

    imp = sub.add_parser("import", help="read a llama.cpp/repeng GGUF control vector")
    imp.add_argument("gguf", help="input .gguf control vector")
    imp.add_argument("out", help="output .safetensors file")
    imp.add_argument(
        "--check-model",
        action="store_true",
        help="check that the vector fits --model (width and depth)",
    )
    add_model_args(imp)
    imp.set_defaults(run=run_import)


def _entry_line(entry: Any) -> str:
    span = layer_span(entry.layers)
    status = f"  BROKEN: {entry.problem}" if entry.problem else ""
    tags = f" [{', '.join(entry.tags)}]" if entry.tags else ""
    return (
        f"{entry.name:<24} {entry.method or '?':<12} layers {span:<7} width "
        f"{entry.hidden_size:<5} {entry.model or '?'}{tags}{status}"
    )


def run_vectors(args: argparse.Namespace) -> int:
    from acteng.library import VectorLibrary

    lib = VectorLibrary(args.home)
    if args.action == "add":
        entry = lib.add(args.name, args.file, tags=args.tag, overwrite=args.force)
        print_json(entry.to_json()) if args.json else print(f"added {_entry_line(entry)}")
    elif args.action == "list":
        entries = lib.list(tag=args.tag)
        if args.json:
            print_json([e.to_json() for e in entries])
        else:
            none = f"no vectors tagged {args.tag!r}" if args.tag else "no vectors"
            print("\n".join(_entry_line(e) for e in entries) or f"{none} in {lib.home}")
    elif args.action == "show":
        entry = lib.get(args.name)
        payload = entry.to_json()
        if entry.problem is None:
            payload["metadata"] = dict(lib.load(args.name).metadata)
        if args.json:
            print_json(payload)
        else:
            for key, value in payload.items():
                print(f"{key:>13}: {value}")
    elif args.action == "rm":
        lib.remove(args.name)
        print(f"removed {args.name}")
    elif args.action == "rename":
        lib.rename(args.old, args.new)
        print(f"renamed {args.old} -> {args.new}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from acteng.gguf_vectors import export_gguf
    from acteng.library import load_vector

    check_writable(args.out, "gguf")
    vector = load_vector(args.vector)
    path = export_gguf(vector, args.out, model_hint=args.model_hint)
    print(f"wrote {path}: layers {list(vector.layers)} as direction.{{n}} (llama.cpp block n)")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from acteng.cli.common import load_model_from_args
    from acteng.gguf_vectors import import_gguf

    check_writable(args.out, "safetensors")
    model = load_model_from_args(args) if args.check_model else None
    vector = import_gguf(args.gguf, model=model)
    path = vector.save(args.out)
    print(f"wrote {path}: layers {list(vector.layers)}, width {vector.hidden_size}")
    return 0
