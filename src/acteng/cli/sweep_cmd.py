"""``acteng sweep`` and ``acteng tune``: score a grid of settings, or choose the best one."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acteng.cli.common import (
    add_backend_args,
    add_model_args,
    backend_from_args,
    check_writable,
    load_model_from_args,
    print_json,
)
from acteng.errors import ConfigError

if TYPE_CHECKING:
    from acteng.evaluation.scoring import Cell
    from acteng.evaluation.sweep import SweepResult
    from acteng.pairs import Pairs


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"cannot read {what} {text!r}; write numbers like 1,2,4,8") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{what} must be finite numbers, got {text!r}; e.g. 1,2,4,8")
    return values


def _grid_args(p: argparse.ArgumentParser, methods: str, layers: str) -> None:
    p.add_argument("--pairs", required=True, help="JSONL/JSON file or bundled dataset name")
    p.add_argument(
        "--test",
        default=None,
        help="measure the effect on this pairs file (its test split if marked, else all of "
        "it) and fit on every pair of --pairs, instead of holding out part of --pairs",
    )
    p.add_argument("--methods", default=methods, help=f"comma-separated (default: {methods})")
    p.add_argument("--layers", default=layers, help=f"layers to try (default: {layers})")
    p.add_argument(
        "--coefficients", default="1,2,4,8", help="coefficients to try (default: 1,2,4,8)"
    )
    p.add_argument(
        "--position", default="last", help="read position: last (default), mean or answer"
    )
    add_model_args(p)
    add_backend_args(p)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sweep",
        help="score methods x layers x coefficients: effect, tax, plots",
        description="Fit each method at every layer from one pass over the training pairs, "
        "then score every method x layer x coefficient on the held-out pairs (or --test): "
        "behaviour effect (log-prob margin shift of positive over negative answers; bare "
        "pairs answer the user turn 'Say something.') and perplexity tax on bundled neutral text. "
        "Writes OUT/sweep.json after every cell (Ctrl-C keeps what was scored) and heatmaps "
        "plus an effect-vs-tax frontier as SVG.",
    )
    _grid_args(p, "mean_diff", "all")
    p.add_argument("--out", required=True, help="folder for sweep.json and the plots")
    p.add_argument("--max-tax", type=float, default=None, help="mark this budget on the plots")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=run_sweep)

    t = sub.add_parser(
        "tune",
        help="choose method, layers and coefficient within a tax budget",
        description="Choose the method, layer(s) and coefficient that steer the held-out "
        "pairs (or --test) most while the perplexity tax stays within --max-tax; write the "
        "vector (only its chosen layers) so that adding coefficient * vector reproduces the "
        "effect. Pairs with a prompt are measured as answers to it, bare pairs (no prompt) "
        "as the assistant's answer to the user turn 'Say something.'",
    )
    _grid_args(t, "mean_diff,pca,probe", "2-20")
    t.add_argument(
        "--max-tax", type=float, default=0.05, help="relative perplexity budget (default 0.05)"
    )
    t.add_argument("--out", required=True, help="where to write the tuned .safetensors vector")
    t.add_argument("--plots", default=None, help="also write the frontier plot to this folder")
    t.add_argument("--json", action="store_true", help="print the choice as JSON")
    t.set_defaults(run=run_tune)


def _data(args: argparse.Namespace) -> tuple[Pairs, Pairs | None]:
    """--pairs and --test, loaded and checked before the model loads or a file is written
    (a missing or empty file, a mixed test set, too few pairs)."""
    from acteng.evaluation.splits import fit_and_test
    from acteng.pairs import load_pairs

    pairs = load_pairs(args.pairs)
    test = load_pairs(args.test) if args.test is not None else None
    fit_and_test(pairs, test)
    return pairs, test


def _progress(total: int) -> Any:
    done = [0]

    def report(cell: Cell) -> None:
        done[0] += 1
        effect = f"{cell.effect:+.3f}" if math.isfinite(cell.effect) else "  n/a "
        tax = f"{100 * cell.tax:+.1f} %" if math.isfinite(cell.tax) else "non-finite"
        count = f"{done[0]}/{total}" if total else str(done[0])
        print(
            f"[{count}] {cell.method} layers {list(cell.layers)} "
            f"c={cell.coefficient:g}: effect {effect}, tax {tax}",
            file=sys.stderr,
            flush=True,
        )

    return report


def _save_plots(result: SweepResult, out: Path, max_tax: float | None) -> list[Path]:
    from acteng.report.export import save_figures
    from acteng.report.figures import sweep_figures

    return save_figures(sweep_figures(result, max_tax=max_tax), out)


def run_sweep(args: argparse.Namespace) -> int:
    from acteng.evaluation.scoring import check_budget
    from acteng.evaluation.sweep import SweepResult, sweep
    from acteng.layer_selection import parse_layers
    from acteng.vectors import atomic_write_bytes

    methods = [m for m in args.methods.split(",") if m]
    coefficients = _floats(args.coefficients, "--coefficients")
    if args.max_tax is not None:
        check_budget(args.max_tax)
    pairs, test = _data(args)
    out = Path(args.out)
    check_writable(str(out / "sweep.json"))
    backend = backend_from_args(args)
    model = load_model_from_args(args)
    layers = parse_layers(model, args.layers)
    result = SweepResult({}, (), (), (), 0.0, 0.0, None)
    report = _progress(len(methods) * len(layers) * len(coefficients))

    def save(cell: Cell) -> None:
        report(cell)
        atomic_write_bytes(out / "sweep.json", json.dumps(result.to_json(), indent=2).encode())

    try:
        sweep(
            model,
            pairs,
            methods=methods,
            layers=layers,
            coefficients=coefficients,
            position=args.position,
            on_cell=save,
            result=result,
            backend=backend,
            test=test,
        )
    except KeyboardInterrupt:
        if not result.cells:
            print("acteng sweep: interrupted before any cell was scored; nothing written",
                  file=sys.stderr)  # fmt: skip
            return 130
        _save_plots(result, out, args.max_tax)
        print(
            f"acteng sweep: interrupted; {len(result.cells)} scored cells kept in "
            f"{out / 'sweep.json'} (complete: false)",
            file=sys.stderr,
        )
        return 130
    atomic_write_bytes(out / "sweep.json", json.dumps(result.to_json(), indent=2).encode())
    plots = _save_plots(result, out, args.max_tax)
    if args.json:
        print_json(result.to_json())
        return 0
    print(f"wrote {out / 'sweep.json'} and {len(plots)} plots in {out}")
    for method in result.methods:
        mine = [c for c in result.cells if c.method == method and math.isfinite(c.effect)]
        if mine:
            top = max(mine, key=lambda c: c.effect)
            print(
                f"{method}: largest effect {top.effect:+.3f} at layer {top.layers[0]}, "
                f"c={top.coefficient:g} (tax {100 * top.tax:+.1f} %)"
            )
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from acteng.evaluation.scoring import check_budget
    from acteng.evaluation.tune import tune
    from acteng.report.figures import frontier_chart

    budget = check_budget(args.max_tax)
    methods = [m for m in args.methods.split(",") if m]
    coefficients = _floats(args.coefficients, "--coefficients")
    pairs, test = _data(args)
    check_writable(args.out, "safetensors")
    backend = backend_from_args(args)
    model = load_model_from_args(args)
    result = tune(
        model,
        pairs,
        max_tax=budget,
        methods=methods,
        layers=args.layers,
        coefficients=coefficients,
        position=args.position,
        on_cell=_progress(0),
        backend=backend,
        test=test,
    )
    path = result.vector.save(args.out)
    payload = result.to_json(path)
    if args.plots:
        from acteng.report.export import save_figures

        name = Path(args.pairs).stem
        save_figures({"frontier": frontier_chart(result.candidates, name, budget)}, args.plots)
    if args.json:
        print_json(payload)
        return 0
    grid = result.grid_best
    print(
        f"tuned: {result.method} at layers {list(result.layers)}, coefficient "
        f"{result.coefficient:g}: effect {result.effect:+.3f} nats, tax "
        f"{100 * result.tax:+.2f} % (budget {100 * budget:g} %)"
    )
    print(f"effect: {result.vector.metadata['tuning']['effect_measure']}")
    if grid is not None:
        print(
            f"best single-layer mean_diff grid point: layer {grid.layers[0]}, c="
            f"{grid.coefficient:g}: effect {grid.effect:+.3f}, tax {100 * grid.tax:+.2f} %"
        )
    print(f"wrote {path}")
    return 0
