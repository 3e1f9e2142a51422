"""Which pairs a steering setting is fit on and which it is measured on.

Sweeps and tuning fit vectors on one part of the data and measure the effect on another:

- `held_out(dataset)`: the dataset's own train/test split, or every fifth pair held out;
- `fit_and_test(dataset, test)`: with a separate test set, every pair of the dataset is
  fit on and the test set (`measured_part`: its test split when it marks one, else all of
  it, as `evaluate` measures) is measured on.

The effect (`acteng.evaluation.scoring`) is the mean log-prob margin of each pair's
positive over its negative side as the assistant's answer: to the pair's prompt, or for a
bare pair (no prompt) to a neutral user turn (`metrics.BARE_PROMPT`, "Say something.").
A measured set is of one form (`pairs.pair_form`: a mix is refused, naming the items); the
training pairs and a separate test set may differ in form, e.g. bare training pairs and
prompted test pairs: vectors read from bare texts, measured on answers to questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from acteng.errors import DataError
from acteng.evaluation.metrics import BARE_PROMPT
from acteng.pairs import Pairs, load_pairs, pair_form

__all__ = ["effect_measure", "fit_and_test", "held_out", "measured_part"]


def held_out(dataset: Pairs) -> tuple[Pairs, Pairs]:
    """(fit, held-out) pairs: the dataset's own train/test split, or every fifth pair held
    out when it has none. Both parts need enough pairs to mean something, and the
    held-out part one form (`pair_form`).

    >>> fit, test = held_out(acteng.load_pairs("sentiment"))
    """
    if any(p.split == "test" for p in dataset):
        fit, test = dataset.split("train"), dataset.split("test")
        numbers = [i for i, p in enumerate(dataset, start=1) if p.split == "test"]
    else:
        fit = Pairs(tuple(p for i, p in enumerate(dataset) if i % 5 != 4), name=dataset.name)
        test = Pairs(tuple(p for i, p in enumerate(dataset) if i % 5 == 4), name=dataset.name)
        numbers = [i for i in range(1, len(dataset) + 1) if i % 5 == 0]
    if len(fit) < 2 or len(test) < 1:
        raise DataError(
            f"dataset {dataset.name!r} has {len(fit)} pairs to fit and {len(test)} to hold out; "
            "tuning needs at least 2 and 1 (give more pairs, or mark some 'split': 'test')"
        )
    pair_form(test, f"the held-out part of dataset {dataset.name!r}", numbers)
    _check_contrast(dataset.name, fit)
    return fit, test


def _check_contrast(name: str, fit: Pairs) -> None:
    if all(p.positive == p.negative for p in fit):
        raise DataError(
            f"dataset {name!r}: every pair's positive equals its negative, so there "
            "is no contrast to learn; the two sides must differ in the concept"
        )


def measured_part(dataset: Pairs) -> Pairs:
    """What a test set is measured on: its test split when it marks one, else all of it;
    refused when it mixes bare and prompted pairs (the items are named by their number in
    the file)."""
    if not any(p.split == "test" for p in dataset):
        pair_form(dataset, f"test set {dataset.name!r}")
        return dataset
    numbers = [i for i, p in enumerate(dataset, start=1) if p.split == "test"]
    test = dataset.split("test")
    pair_form(test, f"the test split of {dataset.name!r}", numbers)
    return test


def fit_and_test(
    dataset: Pairs, test: Pairs | str | Path | Sequence[Any] | None
) -> tuple[Pairs, Pairs]:
    """(fit, measured) pairs: `held_out(dataset)` without a `test` set; with one, every
    pair of `dataset` is fit on (its split marks ignored) and `measured_part(test)` is
    measured on. The two may differ in form but share no pair (same positive and negative
    text), so the effect is on pairs the vectors were not fit on.

    >>> fit, measured = fit_and_test(acteng.load_pairs("bare.jsonl"), "prompted.jsonl")
    """
    if test is None:
        return held_out(dataset)
    measured = measured_part(load_pairs(test))
    if len(dataset) < 2:
        raise DataError(
            f"dataset {dataset.name!r} has {len(dataset)} pair to fit; tuning needs at least 2"
        )
    _check_contrast(dataset.name, dataset)
    seen = {(p.positive, p.negative) for p in dataset}
    shared = [i for i, p in enumerate(measured, start=1) if (p.positive, p.negative) in seen]
    if shared:
        shown = ", ".join(str(i) for i in shared[:10]) + (", ..." if len(shared) > 10 else "")
        raise DataError(
            f"{len(shared)} of the {len(measured)} test pairs of {measured.name!r} (item(s) "
            f"{shown}) are also in the training pairs {dataset.name!r}, which are all fit on "
            "when a test set is given; measure on pairs the vectors were not fit on (drop "
            "them from one file)"
        )
    return dataset, measured


def effect_measure(measured: Pairs, separate: bool) -> str:
    """What the effect measured on `measured` means, in words (recorded in a tuned
    vector's metadata); `separate`: a test set rather than the held-out part."""
    text = f"mean log-prob margin shift (nats) on the {'test' if separate else 'held-out'} pairs"
    if pair_form(measured, f"dataset {measured.name!r}") == "bare":
        text += (
            " (bare pairs: each side scored as the assistant's whole answer to the user turn "
            f"{BARE_PROMPT!r} in the chat template)"
        )
    return text
