"""Holding pairs out by whole documents: the validation cut and the cross-fitting folds.

Pairs built from one document or one wrapper wording are not independent: a detector that
fitted some of them scores the rest as if they were seen. A threshold calibrated on pairs
whose document was fitted is too low for unseen documents (the `prompt_injection` detector
flagged 11.8 % of clean test documents at a 5 % target that way, docs/defences.md), so
every held-out set here is made of whole groups of pairs that share text.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from acteng.errors import ConfigError
from acteng.pairs import Pairs

__all__ = ["first_of_each_group", "group_folds", "shared_text_groups", "validation_cut"]

SHARED_RUN = 12  # words: pairs whose negatives share a run this long share a source


def shared_text_groups(texts: Sequence[str], run: int = SHARED_RUN) -> list[int]:
    """A group id per text: texts that share a run of `run` consecutive words (the same
    document, the same wrapper) are in one group, transitively. Calibrating on whole
    groups kept out of fitting, rather than on single pairs whose document was fitted,
    gives a threshold that carries over to unseen documents."""
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        words = text.split()
        for j in range(len(words) - run + 1):
            k = first.setdefault(" ".join(words[j : j + run]), i)
            if k != i:
                parent[root(i)] = root(k)
    return [root(i) for i in range(len(texts))]


def first_of_each_group(texts: Sequence[str]) -> list[int]:
    """The index of the first text of each of their `shared_text_groups`, in order: every
    document once, where a set holds near-copies of it (pairs that differ by one line)."""
    seen: set[int] = set()
    firsts = []
    for i, g in enumerate(shared_text_groups(texts)):
        if g not in seen:
            seen.add(g)
            firsts.append(i)
    return firsts


def _seeded_groups(train: Pairs, seed: int) -> tuple[list[int], Counter[int], list[int]]:
    """The pairs' `shared_text_groups` (of their negatives), each group's size, and the
    groups in a seeded order."""
    groups = shared_text_groups([p.negative for p in train])
    sizes = Counter(groups)
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    return groups, sizes, order


def validation_cut(train: Pairs, share: float, seed: int) -> tuple[Pairs, Pairs]:
    """The pairs split in two: those to fit on, and a seeded `share` kept out for
    calibration, taken in whole `shared_text_groups` (pairs that share a document or
    wrapper stay on one side)."""
    groups, sizes, order = _seeded_groups(train, seed)
    wanted, held_groups, count = max(1, round(len(train) * share)), set(), 0
    for g in order:
        if count >= wanted:
            break
        held_groups.add(g)
        count += sizes[g]
    fit = tuple(p for p, g in zip(train, groups, strict=True) if g not in held_groups)
    cut = tuple(p for p, g in zip(train, groups, strict=True) if g in held_groups)
    if not fit:
        raise ConfigError(
            "the train pairs all share text (one document or wrapper), so none are left to "
            "fit on after keeping a validation share out; calibrate_on='test' instead"
        )
    return Pairs(fit, name=f"{train.name}:fit"), Pairs(cut, name=f"{train.name}:calibration")


def group_folds(train: Pairs, folds: int, seed: int) -> list[int]:
    """A fold index (0 to `folds` - 1) per pair, in whole `shared_text_groups` (pairs that
    share a document or wrapper stay in one fold): largest groups first (ties in seeded
    order), each to the fold with the fewest pairs so far."""
    groups, sizes, order = _seeded_groups(train, seed)
    order.sort(key=lambda g: -sizes[g])
    load, fold_of = [0] * folds, {}
    for g in order:
        k = min(range(folds), key=lambda j: (load[j], j))
        fold_of[g] = k
        load[k] += sizes[g]
    if min(load) == 0:
        raise ConfigError(
            f"the train pairs fall into {len(sizes)} groups of shared text (documents or "
            f"wrappers), fewer than the {folds} folds cross-fitting needs; give more "
            "independent pairs or calibrate_on='validation'"
        )
    return [fold_of[g] for g in groups]
