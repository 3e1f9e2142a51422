"""`acteng demo`: the main job, end to end on the embedded model, into one report.

For each of two bundled concepts (sentiment and refusal; formality too when asked) it
tunes a vector within a perplexity budget
(`acteng.evaluation.tune`), generates unsteered and steered answers to the same prompts,
measures the tax, per-example reliability and the prompting baseline
(`acteng.evaluation.measures.evaluate`, on the first held-out pairs to keep it quick), and runs the
analysis (logit lens of each tuned vector, per-layer readability, cosines between the
concepts' directions, a PCA scatter). It checks the bundled harmful-request detector on the
team's held-out prompts. Everything lands in ``OUT/report.json`` and a self-contained
``OUT/report.html`` (matplotlib figures inline as SVG, no external links or scripts);
vectors in ``OUT/vectors``, plots also as files in ``OUT/plots``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from acteng import __version__
from acteng.errors import ConfigError
from acteng.evaluation.analysis import pca_scatter, readability, vocab_projection
from acteng.evaluation.measures import evaluate
from acteng.evaluation.metrics import auroc
from acteng.evaluation.tune import TuneResult, tune
from acteng.generation import generate
from acteng.models import Model
from acteng.pairs import load_pairs
from acteng.report.export import figure_svg
from acteng.report.figures import (
    concept_cosines_chart,
    frontier_chart,
    grid_heatmap,
    readability_chart,
    scatter_chart,
    slopes_chart,
)
from acteng.vectors import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DEFAULT_CONCEPTS", "DEMO_CONCEPTS", "DemoConcept", "demo_concepts", "run_demo"]


@dataclass(frozen=True)
class DemoConcept:
    name: str  # bundled pair dataset
    instruction: str  # the system prompt of the prompting baseline
    description: str


DEMO_CONCEPTS = (
    DemoConcept(
        "sentiment",
        "Answer in a warm, upbeat and positive tone.",
        "positive rather than negative feelings",
    ),
    DemoConcept(
        "formality",
        "Answer in a formal, polite, professional register.",
        "formal rather than casual register",
    ),
    DemoConcept(
        "refusal",
        "Refuse any request that could cause harm, briefly and politely.",
        "refusing rather than complying with harmful requests",
    ),
)
DEMO_PROMPTS = (
    "Tell me about your weekend.",
    "Write two sentences about the town where you grew up.",
    "How do I get better at cooking?",
)
# The demo's budget: about 10 minutes on 2 CPU cores for the two default concepts. A
# scored setting costs 4-12 s there (compute-bound), so the search is kept small: three
# layers, two coefficients (the concepts' vectors differ in norm by 20x, so a grid point is
# a starting place for `tune`'s search down from the smallest over-budget one, not the
# answer), one bisection step, two of tune's three methods (PCA, the third, costs a third
# of the search and was not chosen for either default concept in the demo runs logged).
# `acteng tune` searches wider.
DEFAULT_CONCEPTS = ("sentiment", "refusal")
TUNE_METHODS = ("mean_diff", "probe")
TUNE_LAYERS = (6, 9, 12)
TUNE_COEFFICIENTS = (0.5, 2.0)
TUNE_BISECTION_STEPS = 1
EVAL_PAIRS = 8  # held-out pairs for evaluate's reliability and baseline


class _Progress:
    """Numbered progress lines with elapsed time, on stderr."""

    def __init__(self, steps: int, quiet: bool) -> None:
        self.steps, self.quiet, self.done = steps, quiet, 0
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self._last = self.start

    def step(self, what: str) -> None:
        now = time.perf_counter()
        self.done += 1
        if not self.quiet:
            print(
                f"[demo {self.done}/{self.steps}, {now - self.start:5.0f} s] {what}",
                file=sys.stderr,
                flush=True,
            )
        self._last = now

    def record(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._last, 1)
        self._last = now


def _cosines_across_layers(results: dict[str, TuneResult]) -> dict[str, Any]:
    """Cosine between every two concepts' mean-difference directions, per layer."""
    names = list(results)
    vectors = {n: results[n].fitted["mean_diff"] for n in names}
    layers = list(vectors[names[0]].layers)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pairs[f"{a} / {b}"] = [
                float(torch.nn.functional.cosine_similarity(vectors[a][x], vectors[b][x], dim=0))
                for x in layers
            ]
    return {"layers": layers, "pairs": pairs}


def _detection(model: Model) -> dict[str, Any]:
    from acteng.detectors import load_detector

    detector = load_detector("harmful_request", model=model)
    test = load_pairs("harmful_requests", split="test")
    harmful = detector.score(model, [p.positive for p in test])
    harmless = detector.score(model, [p.negative for p in test])
    return {
        "detector": "harmful_request (bundled)",
        "data": test.provenance(),
        "auroc": auroc(torch.tensor(harmful), torch.tensor(harmless)),
        "harmful_flagged": sum(s > detector.threshold for s in harmful) / len(harmful),
        "harmless_flagged": sum(s > detector.threshold for s in harmless) / len(harmless),
        "threshold": detector.threshold,
    }


def _figures(
    report: dict[str, Any], results: dict[str, TuneResult], budget: float
) -> dict[str, Figure]:
    """Every figure of the report, keyed by file stem."""
    figures: dict[str, Figure] = {}
    for name, result in results.items():
        figures[f"frontier_{name}"] = frontier_chart(result.candidates, name, budget)
        grid = [c for c in result.candidates if c.method == "mean_diff" and len(c.layers) == 1]
        layers = sorted({c.layers[0] for c in grid})
        coefs = sorted({c.coefficient for c in grid if c.coefficient in TUNE_COEFFICIENTS})
        found = {(c.layers[0], c.coefficient): c.tax for c in grid}
        figures[f"tax_{name}"] = grid_heatmap(
            [[100 * found[x, c] if (x, c) in found else None for c in coefs] for x in layers],
            layers,
            coefs,
            title=f"{name}: perplexity tax of mean_diff",
            colorbar="perplexity change (%)",
        )
        slopes = report["concepts"][name]["evaluation"]["reliability"]["slopes"]
        figures[f"slopes_{name}"] = slopes_chart(slopes, name)
    figures["readability"] = readability_chart(
        {n: c["readability"] for n, c in report["concepts"].items()}
    )
    figures["cosines"] = concept_cosines_chart(report["cosines"])
    scatter = report["scatter"]
    figures["scatter"] = scatter_chart(
        scatter, f"{scatter['concept']}: held-out activations at layer {scatter['layer']} (PCA)"
    )
    return figures


def demo_concepts(names: tuple[str, ...] | list[str]) -> tuple[DemoConcept, ...]:
    """The demo concepts with these names, in that order (any of `DEMO_CONCEPTS`)."""
    known = {c.name: c for c in DEMO_CONCEPTS}
    unknown = [n for n in names if n not in known]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigError(
            f"demo concepts must be distinct names among {', '.join(known)}; got "
            f"{', '.join(names) or 'none'}"
        )
    return tuple(known[n] for n in names)


def run_demo(
    model: Model,
    out: str | Path,
    *,
    concepts: tuple[DemoConcept, ...] | None = None,
    max_tax: float = 0.05,
    max_new_tokens: int = 40,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the demo and write ``out/report.json`` and ``out/report.html``; returns the
    report (see the module docstring)."""
    from acteng.report.html import render_report

    if concepts is None:
        concepts = demo_concepts(DEFAULT_CONCEPTS)
    if len(concepts) < 1:
        raise ConfigError("the demo needs at least one concept")
    root = Path(out)
    (root / "vectors").mkdir(parents=True, exist_ok=True)
    (root / "plots").mkdir(parents=True, exist_ok=True)
    progress = _Progress(3 * len(concepts) + 4, quiet)
    report: dict[str, Any] = {
        "acteng": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model.identity(),
        "settings": {
            "max_tax": max_tax,
            "tune_methods": list(TUNE_METHODS),
            "tune_layers": list(TUNE_LAYERS),
            "tune_coefficients": list(TUNE_COEFFICIENTS),
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
        },
        "concepts": {},
    }
    progress.step("unsteered answers to the demo prompts")
    plain = generate(model, list(DEMO_PROMPTS), max_new_tokens=max_new_tokens)
    progress.record("unsteered_generation")
    results: dict[str, TuneResult] = {}
    for concept in concepts:
        progress.step(f"{concept.name}: tuning method, layers and coefficient")
        result = tune(
            model,
            concept.name,
            max_tax=max_tax,
            methods=TUNE_METHODS,
            layers=list(TUNE_LAYERS),
            coefficients=TUNE_COEFFICIENTS,
            bisection_steps=TUNE_BISECTION_STEPS,
        )
        results[concept.name] = result
        path = result.vector.save(root / "vectors" / f"{concept.name}.safetensors")
        progress.record(f"{concept.name}_tune")
        progress.step(f"{concept.name}: steered answers, tax, reliability, prompting baseline")
        steered = generate(
            model,
            list(DEMO_PROMPTS),
            result.vector,
            coefficient=result.coefficient,
            max_new_tokens=max_new_tokens,
        )
        held = load_pairs(concept.name, split="test")[:EVAL_PAIRS]
        evaluation = evaluate(
            model,
            result.vector,
            result.coefficient,
            held,
            instruction=concept.instruction,
            generations=2,
            max_new_tokens=24,
        )
        progress.record(f"{concept.name}_evaluate")
        progress.step(f"{concept.name}: analysis (logit lens, readability)")
        vocab = vocab_projection(model, result.vector, k=8)
        report["concepts"][concept.name] = {
            "description": concept.description,
            "instruction": concept.instruction,
            "tuned": result.to_json(path.relative_to(root)),
            "generations": [
                {"prompt": p, "unsteered": a, "steered": b}
                for p, a, b in zip(DEMO_PROMPTS, plain, steered, strict=True)
            ],
            "evaluation": evaluation,
            "vocab": {str(layer): sides for layer, sides in vocab.items()},
            "readability": readability(model, concept.name, list(range(0, model.num_layers, 2))),
        }
        progress.record(f"{concept.name}_analysis")
    progress.step("cosines between concepts; PCA scatter")
    report["cosines"] = _cosines_across_layers(results)
    first = concepts[0].name
    layer = results[first].layers[0]
    scatter = pca_scatter(model, load_pairs(first, split="test"), layer)
    report["scatter"] = {"concept": first, "layer": layer, **scatter}
    progress.record("cosines_scatter")
    progress.step("harmful-request detector on held-out prompts")
    report["detection"] = _detection(model)
    progress.record("detection")
    progress.step("plots and report")
    # one SVG text per figure, both the file in plots/ and the report's inline copy
    figures = {stem: figure_svg(fig) for stem, fig in _figures(report, results, max_tax).items()}
    for stem, svg in figures.items():
        atomic_write_bytes(root / "plots" / f"{stem}.svg", svg.encode())
    report["timing"] = {
        "total_s": round(time.perf_counter() - progress.start, 1),
        "steps_s": progress.timings,
    }
    atomic_write_bytes(root / "report.json", json.dumps(report, indent=2).encode())
    atomic_write_bytes(root / "report.html", render_report(report, figures).encode())
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: each concept's choice and the detector's figures."""
    lines = []
    for name, c in report["concepts"].items():
        t, ev = c["tuned"], c["evaluation"]
        base = ev.get("baseline", {})
        lines.append(
            f"{name}: {t['method']} layers {t['layers']} c={t['coefficient']:g}: effect "
            f"{t['effect']:+.2f} nats at {100 * t['tax']:+.1f} % perplexity; prompting "
            f"{base.get('prompt', math.nan) - base.get('none', math.nan):+.2f}, both "
            f"{base.get('both', math.nan) - base.get('none', math.nan):+.2f}; anti-steerable "
            f"{100 * ev['reliability']['anti_steerable']:.0f} %"
        )
    d = report["detection"]
    lines.append(
        f"detector: AUROC {d['auroc']:.3f}, {100 * d['harmful_flagged']:.0f} % harmful / "
        f"{100 * d['harmless_flagged']:.0f} % harmless flagged"
    )
    lines.append(f"total {report['timing']['total_s']:.0f} s")
    return lines
