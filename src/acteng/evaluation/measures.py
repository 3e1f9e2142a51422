"""One steering setting, every measure: what `acteng eval` reports.

`evaluate` takes a vector, a coefficient (and optionally layers and an instruction for the
prompting baseline) and a dataset, and measures on the dataset's test split (all of it when
there is no split):

- behaviour: the mean log-prob margin of positive over negative answers, unsteered and
  steered (for A/B items also p(match) and the answer-format mass); each side is the
  assistant's answer to the pair's prompt, or for bare pairs (no prompt) to the neutral
  user turn `metrics.BARE_PROMPT`, as in sweeps and tuning (`acteng.evaluation.splits`);
  a mix of the two is refused;
- tax: perplexity of the bundled neutral text and accuracy on the bundled general-knowledge
  questions (test splits), unsteered and steered, the next-token KL on those questions,
  and distinct-2 / repeated 4-grams of greedy answers to them;
- reliability: per-example steerability at -c, 0, +c and pre-steering pair diagnostics;
- baseline (with an instruction): margin under nothing / steering / prompt / both.

The relative perplexity tax is ``steered / unsteered - 1`` (0.05 = 5 % worse).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from acteng.backends import BackendChoice, resolve_backend
from acteng.errors import ConfigError
from acteng.evaluation.metrics import ab_match, logprob_margin, next_token_kl, prompting_baseline
from acteng.evaluation.reliability import pair_diagnostics, steerability
from acteng.evaluation.splits import measured_part
from acteng.evaluation.tax import distinct_n, load_eval, mc_accuracy, perplexity, repeated_ngrams
from acteng.generation import generate
from acteng.models import Model
from acteng.pairs import Pairs, load_pairs, pair_form
from acteng.steering.spec import SteeringSpec
from acteng.vectors import SteeringVector

__all__ = ["evaluate"]


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def evaluate(
    model: Model,
    vector: SteeringVector,
    coefficient: float,
    data: Pairs | str | Path | Sequence[Any],
    *,
    layers: Sequence[int] | None = None,
    instruction: str | None = None,
    generations: int = 8,
    max_new_tokens: int = 32,
    backend: BackendChoice = "local",
) -> dict[str, Any]:
    """Every measure for one steering setting (see the module docstring).

    `backend` ``"ray"`` measures behaviour, tax, reliability and the baseline as separate
    tasks on Ray actors that load the model from its recipe (`Backend.map` over the
    parts); the report is the same.
    """
    if not math.isfinite(coefficient):
        raise ConfigError(f"coefficient must be a finite number, got {coefficient}")
    spec = SteeringSpec(vector, coefficient=coefficient, layers=tuple(layers) if layers else None)
    test = measured_part(load_pairs(data))
    chosen = list(layers) if layers else list(vector.layers)
    parts: list[Part] = [
        (measure_behaviour, (test, spec)),
        (measure_tax, (spec, generations, max_new_tokens)),
        (measure_reliability, (test, vector, coefficient, layers, chosen)),
    ]
    if instruction:
        parts.append((prompting_baseline, (test, spec, instruction)))
    results = resolve_backend(backend).map(model, run_part, parts)
    try:  # the first result is checked before the others are waited for
        behaviour, steered_margin = next(results)
        if not any(math.isfinite(x) for x in steered_margin):
            raise ConfigError(
                f"coefficient {coefficient} makes the model's outputs non-finite; use a smaller one"
            )
        tax, examples = next(results)
        report: dict[str, Any] = {
            "setting": {
                "coefficient": coefficient,
                "layers": chosen,
                "method": vector.metadata.get("method"),
            },
            "behaviour": behaviour,
            "tax": tax,
            "reliability": next(results),
            "examples": examples,
        }
        if instruction:
            report["baseline"] = next(results)
    finally:
        results.close()  # stops the remaining parts at once when a check fails
    return report


# One measure: a function of the model and these arguments (run here or on a Ray actor).
Part = tuple[Callable[..., Any], tuple[Any, ...]]


def run_part(model: Model, part: Part) -> Any:
    """One measure's result: what a backend maps over the parts."""
    fn, args = part
    return fn(model, *args)


def measure_behaviour(
    model: Model, test: Pairs, spec: SteeringSpec
) -> tuple[dict[str, Any], list[float]]:
    """The behaviour section, and the steered margins (to check they are finite)."""
    base_margin = logprob_margin(model, test)
    steered_margin = logprob_margin(model, test, spec)
    behaviour: dict[str, Any] = {
        "dataset": test.provenance(),
        "pair_form": pair_form(test, f"dataset {test.name!r}"),
        "margin_unsteered": _mean(base_margin),
        "margin_steered": _mean(steered_margin),
        "margin_shift": _mean(steered_margin) - _mean(base_margin),
    }
    if all(p.ab for p in test):
        plain, moved = ab_match(model, test), ab_match(model, test, spec)
        behaviour.update(
            p_match_unsteered=_mean([p for p, _ in plain]),
            p_match_steered=_mean([p for p, _ in moved]),
            format_mass_unsteered=_mean([m for _, m in plain]),
            format_mass_steered=_mean([m for _, m in moved]),
        )
    return behaviour, steered_margin


def measure_tax(
    model: Model, spec: SteeringSpec, generations: int, max_new_tokens: int
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The tax section, and three example answers unsteered and steered."""
    texts = load_eval("neutral_text", split="test")
    items = load_eval("general_knowledge", split="test")
    questions = [i.question for i in items]
    ppl_base, ppl_steered = perplexity(model, texts), perplexity(model, texts, spec)
    answers = generate(model, questions[:generations], spec, max_new_tokens=max_new_tokens)
    plain_answers = generate(model, questions[:generations], max_new_tokens=max_new_tokens)
    tax = {
        "perplexity_unsteered": ppl_base,
        "perplexity_steered": ppl_steered,
        "perplexity_tax": ppl_steered / ppl_base - 1.0,
        "mc_accuracy_unsteered": mc_accuracy(model, items),
        "mc_accuracy_steered": mc_accuracy(model, items, spec),
        "next_token_kl": _mean(next_token_kl(model, questions, spec)),
        "distinct_2_unsteered": distinct_n(plain_answers, 2),
        "distinct_2_steered": distinct_n(answers, 2),
        "repeated_4grams_steered": repeated_ngrams(answers, 4),
    }
    examples = [
        {"prompt": q, "unsteered": a, "steered": b}
        for q, a, b in zip(questions, plain_answers, answers, strict=False)
    ][:3]
    return tax, examples


def measure_reliability(
    model: Model,
    test: Pairs,
    vector: SteeringVector,
    coefficient: float,
    layers: Sequence[int] | None,
    chosen: list[int],
) -> dict[str, Any]:
    """Steerability at -c, 0, +c and the pre-steering pair diagnostics."""
    reach = abs(coefficient) or 1.0
    slopes = steerability(model, test, vector, (-reach, 0.0, reach), layers=layers)
    return {
        **slopes.to_json(),
        "diagnostics": [d.to_json() for d in pair_diagnostics(model, test, chosen)]
        if len(test) >= 2
        else [],
    }
