"""``acteng analyze``: what a vector promotes, where its concept is readable, how it relates."""

from __future__ import annotations

import argparse
from typing import Any

from acteng.cli.common import add_model_args, load_model_from_args, print_json


def register(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="logit lens of a vector, readability per layer, cosines, PCA scatter",
        description="Analyse a vector: the tokens each layer's direction promotes and "
        "suppresses (final norm + unembedding); with --pairs, held-out probe readability "
        "per layer and a 2-D PCA scatter at --scatter-layer; cosines across layers.",
    )
    p.add_argument("vector", help="vector file or library name")
    p.add_argument("--pairs", default=None, help="dataset for readability and the scatter")
    p.add_argument("--layers", default=None, help="layers for readability (default: all)")
    p.add_argument("--scatter-layer", type=int, default=None)
    p.add_argument("--top", type=int, default=10, help="tokens listed per side (default 10)")
    p.add_argument("--plots", default=None, help="write SVG plots to this folder")
    p.add_argument("--json", action="store_true")
    add_model_args(p)
    p.set_defaults(run=run_analyze)


def _write_plots(folder: str, name: str, report: dict[str, Any]) -> list[str]:
    from pathlib import Path

    from acteng.report.export import save_figures
    from acteng.report.figures import cosine_heatmap, readability_chart, scatter_chart

    labels = [str(x) for x in report["layers"]]
    figures = {
        "layer_cosines": cosine_heatmap(
            report["layer_cosines"], labels, f"{name}: cosine across layers"
        )
    }
    if "readability" in report:
        figures["readability"] = readability_chart({name: report["readability"]})
    if "scatter" in report:
        title = f"{name}: activations at layer {report['scatter_layer']} (PCA)"
        figures["scatter"] = scatter_chart(report["scatter"], title)
    return [str(p) for p in save_figures(figures, Path(folder))]


def run_analyze(args: argparse.Namespace) -> int:
    from acteng.errors import ConfigError
    from acteng.evaluation.analysis import layer_cosines, pca_scatter, readability, vocab_projection
    from acteng.library import load_vector

    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    model = load_model_from_args(args)
    vector = load_vector(args.vector, model=model)
    report: dict[str, Any] = {
        "layers": list(vector.layers),
        "vocab": {
            str(layer): sides
            for layer, sides in vocab_projection(model, vector, k=args.top).items()
        },
        "layer_cosines": layer_cosines(vector),
    }
    if args.pairs:
        report["readability"] = readability(model, args.pairs, args.layers)
        if args.scatter_layer is not None:
            report["scatter"] = pca_scatter(model, args.pairs, args.scatter_layer)
            report["scatter_layer"] = args.scatter_layer
    elif args.scatter_layer is not None:
        raise ConfigError("--scatter-layer needs --pairs (the activations to scatter)")
    if args.plots:
        from pathlib import Path

        report["plots"] = _write_plots(args.plots, Path(args.vector).stem, report)
    if args.json:
        print_json(report)
        return 0
    for layer, sides in report["vocab"].items():
        up = " ".join(repr(t) for t, _ in sides["promoted"])
        down = " ".join(repr(t) for t, _ in sides["suppressed"])
        print(f"layer {layer}\n  promotes:   {up}\n  suppresses: {down}")
    for row in report.get("readability", []):
        print(
            f"readability layer {row['layer']:2d}: AUROC {row['auroc']:.3f}, "
            f"accuracy {row['accuracy']:.3f}"
        )
    for path in report.get("plots", []):
        print(f"wrote {path}")
    return 0
