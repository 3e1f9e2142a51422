"""One steering setting, every measure: what `acteng eval` reports.

`evaluate` takes a vector, a coefficient (and optionally layers and an instruction for the
prompting baseline) and a dataset, and measures on the dataset's test split (all of it when
there is no split):

- behaviour: the mean log-prob margin of positive over negative answers, unsteered and
  steered (for A/B items also p(match) and the answer-format mass);
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from acteng.errors import ConfigError
from acteng.generation import generate
from acteng.metrics import ab_match, logprob_margin, next_token_kl, prompting_baseline
from acteng.models import Model
from acteng.pairs import Pairs, load_pairs
from acteng.reliability import pair_diagnostics, steerability
from acteng.steering import SteeringSpec
from acteng.tax import distinct_n, load_eval, mc_accuracy, perplexity, repeated_ngrams
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
) -> dict[str, Any]:
    """Every measure for one steering setting (see the module docstring)."""
    if not math.isfinite(coefficient):
        raise ConfigError(f"coefficient must be a finite number, got {coefficient}")
    spec = SteeringSpec(vector, coefficient=coefficient, layers=tuple(layers) if layers else None)
    dataset = load_pairs(data)
    test = dataset.split("test") if any(p.split == "test" for p in dataset) else dataset
    if any(p.prompt is None for p in test):
        raise ConfigError(
            "eval measures answers to prompts: the dataset needs pairs with a 'prompt' "
            "(or CAA A/B items)"
        )
    base_margin = logprob_margin(model, test)
    steered_margin = logprob_margin(model, test, spec)
    behaviour: dict[str, Any] = {
        "dataset": test.provenance(),
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
    if not any(math.isfinite(x) for x in steered_margin):
        raise ConfigError(
            f"coefficient {coefficient} makes the model's outputs non-finite; use a smaller one"
        )

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

    reach = abs(coefficient) or 1.0
    slopes = steerability(model, test, vector, (-reach, 0.0, reach), layers=layers)
    chosen = list(layers) if layers else list(vector.layers)
    reliability = {
        **slopes.to_json(),
        "diagnostics": [d.to_json() for d in pair_diagnostics(model, test, chosen)]
        if len(test) >= 2
        else [],
    }
    report: dict[str, Any] = {
        "setting": {
            "coefficient": coefficient,
            "layers": chosen,
            "method": vector.metadata.get("method"),
        },
        "behaviour": behaviour,
        "tax": tax,
        "reliability": reliability,
        "examples": [
            {"prompt": q, "unsteered": a, "steered": b}
            for q, a, b in zip(questions, plain_answers, answers, strict=False)
        ][:3],
    }
    if instruction:
        report["baseline"] = prompting_baseline(model, test, spec, instruction)
    return report
