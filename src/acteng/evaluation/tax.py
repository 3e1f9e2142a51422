"""What steering costs in general ability: the "alignment tax".

- `perplexity`: of neutral text (no chat template), steered or not. The bundled neutral
  paragraphs (`load_eval("neutral_text")`) were written by the team.
- `mc_accuracy`: on multiple-choice questions, each choice scored as the completion of the
  question by its total log-probability (cloze scoring, lm-evaluation-harness's ``acc``;
  small models handle it better than answer letters, and on the bundled set it beats the
  per-token mean: 0.475 vs 0.342 for SmolLM2-135M); the bundled set
  (`load_eval("general_knowledge")`) was written by the team.
- `distinct_n` and `repeated_ngrams`: fluency of generations (variety of n-grams, and the
  share of word 4-grams that repeat an earlier one in the same text).
- For the shift of next-token distributions use `acteng.evaluation.metrics.next_token_kl`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch

from acteng.errors import ConfigError, DataError
from acteng.evaluation.metrics import Steering, batched_logits, completion_logprobs
from acteng.models import Model

__all__ = [
    "MCItem",
    "distinct_n",
    "load_eval",
    "mc_accuracy",
    "perplexity",
    "repeated_ngrams",
]

EVAL_SETS = ("neutral_text", "general_knowledge")


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice question; `answer` is the index of the correct choice."""

    question: str
    choices: tuple[str, ...]
    answer: int

    def __post_init__(self) -> None:
        if not self.question or len(self.choices) < 2 or not all(self.choices):
            raise DataError("a multiple-choice item needs a question and at least 2 choices")
        if not 0 <= self.answer < len(self.choices):
            raise DataError(
                f"answer {self.answer} is not a choice index (0-{len(self.choices) - 1})"
            )


Split = Literal["train", "test", "all"]


def eval_rows(name: str, *, split: Split = "all") -> list[dict[str, Any]]:
    """The JSON rows of a bundled evaluation set, with every field (`load_eval` keeps what a
    measure reads; `acteng.training.neutral_texts` also reads a row's ``domains``)."""
    if name not in EVAL_SETS:
        raise ConfigError(f"no evaluation set {name!r}; choose from {', '.join(EVAL_SETS)}")
    path = Path(__file__).parent.parent / "data" / "eval" / f"{name}.jsonl"
    rows: list[dict[str, Any]] = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line
    ]
    return [r for r in rows if split == "all" or r.get("split", "train") == split]


@overload
def load_eval(name: Literal["neutral_text"], *, split: Split = "all") -> list[str]: ...
@overload
def load_eval(name: Literal["general_knowledge"], *, split: Split = "all") -> list[MCItem]: ...
def load_eval(name: str, *, split: Split = "all") -> list[str] | list[MCItem]:
    """A bundled evaluation set: ``neutral_text`` (paragraphs) or ``general_knowledge``."""
    rows = eval_rows(name, split=split)
    if name == "neutral_text":
        return [str(r["text"]) for r in rows]
    return [MCItem(r["question"], tuple(r["choices"]), int(r["answer"])) for r in rows]


def perplexity(
    model: Model, texts: Sequence[str], steering: Steering = None, *, batch_size: int = 8
) -> float:
    """Perplexity of `texts` (plain text, BOS added), pooled over all predicted tokens."""
    if not texts or any(not t for t in texts):
        raise ConfigError("perplexity needs non-empty texts")
    encoded = [model.tokenizer(t)["input_ids"] for t in texts]
    for i, ids in enumerate(encoded):
        model.check_length(len(ids), f"text {i}")
    total, count = 0.0, 0
    for chunk, logits in batched_logits(model, encoded, steering, batch_size):
        for row, ids in enumerate(chunk):
            targets = torch.tensor(ids[1:])
            logprobs = torch.log_softmax(logits[row, : len(ids) - 1].double(), dim=-1)
            picked = logprobs[torch.arange(len(ids) - 1), targets]
            total -= float(picked.sum())
            count += len(ids) - 1
    if count == 0:
        raise ConfigError("the texts are too short to score (need at least 2 tokens)")
    return math.exp(total / count)


def mc_accuracy(
    model: Model, items: Sequence[MCItem], steering: Steering = None, *, batch_size: int = 16
) -> float:
    """Share of `items` whose correct choice has the highest total log-probability."""
    if not items:
        raise ConfigError("mc_accuracy needs at least one item")
    prompts = [item.question for item in items for _ in item.choices]
    choices = [choice for item in items for choice in item.choices]
    scores = completion_logprobs(model, prompts, choices, steering, batch_size=batch_size)
    correct, at = 0, 0
    for item in items:
        totals = [total for total, _ in scores[at : at + len(item.choices)]]
        at += len(item.choices)
        correct += int(max(range(len(totals)), key=totals.__getitem__) == item.answer)
    return correct / len(items)


def _words(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Mean over texts of unique word n-grams / all word n-grams (1.0 = no repetition)."""
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    values = []
    for text in texts:
        words = _words(text)
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        if grams:
            values.append(len(set(grams)) / len(grams))
    return sum(values) / len(values) if values else 0.0


def repeated_ngrams(texts: Sequence[str], n: int = 4) -> float:
    """Mean over texts of the share of word n-grams that already occurred in the text."""
    return 1.0 - distinct_n(texts, n) if texts else 0.0
