"""`fit_detector`: a detector from a pairs file, its layers chosen without touching test data.

What ``acteng train-detector`` runs. The pairs' ``test`` split (or, in a file without
splits, a seeded 30 % of the pairs) is held out: it calibrates the threshold and gives the
reported AUROC, and nothing else sees it. With ``layers="auto"`` the train split is cut
again (seeded, 25 % for validation): every layer's direction is fitted on the rest and
scored on the validation pairs in one recording pass, and the three consecutive layers with
the best mean validation AUROC are kept (ties to the window nearest mid-depth). The
detector is then fitted on the whole train split and its choice, validation scores and
held-out figures travel in its metadata.

Every check on the input runs before the model does any work.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from acteng.detectors import (
    READ_REGIONS,
    Detector,
    check_target_fpr,
    sides,
    train_detector,
    train_rows,
)
from acteng.errors import ConfigError, DataError
from acteng.evaluation.metrics import auroc
from acteng.layer_selection import parse_layers
from acteng.methods import METHODS
from acteng.models import Model
from acteng.pairs import Pairs, load_pairs
from acteng.pooling import parse_pooling
from acteng.token_detector import TOKEN_REGIONS, check_labels, train_token_detector
from acteng.vectors import SteeringVector

__all__ = ["DetectorFit", "best_window", "check_detector_pairs", "fit_detector"]

MIN_HELD_OUT = 10  # negatives needed to calibrate a threshold (Detector.calibrate)
MIN_TRAIN = 8  # train pairs needed to fit and, for "auto", to validate layers
WINDOW = 3  # layers kept by "auto"


@dataclass(frozen=True)
class DetectorFit:
    """A fitted detector and what was measured on the way."""

    detector: Detector
    layers: tuple[int, ...]
    validation_auroc: dict[int, float]  # per candidate layer ("auto" only)
    heldout_auroc: float
    heldout_positive_flagged: float  # share of held-out positives above the threshold
    heldout_negative_flagged: float
    train_pairs: int
    heldout_pairs: int

    def summary(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "heldout_auroc": self.heldout_auroc,
            "threshold": self.detector.threshold,
            "heldout_positive_flagged": self.heldout_positive_flagged,
            "heldout_negative_flagged": self.heldout_negative_flagged,
            "train_pairs": self.train_pairs,
            "heldout_pairs": self.heldout_pairs,
            "validation_auroc": {str(k): v for k, v in self.validation_auroc.items()},
        }


def check_detector_pairs(
    pairs: Pairs | str | Path | Sequence[Any],
    region: str,
    *,
    pooling: str = "mean",
    method: str = "probe",
) -> Pairs:
    """The pairs, split for training, or a clear error: runs no model."""
    if region not in READ_REGIONS:
        raise ConfigError(f"unknown region {region!r}; use one of {', '.join(READ_REGIONS)}")
    if parse_pooling(pooling) and (region not in TOKEN_REGIONS or method != "probe"):
        raise ConfigError(
            f"pooling {pooling!r} trains a token-level probe on the user's prompt: use "
            f"--region prompt and --method probe (got region {region!r}, method {method!r}), "
            "or pooling 'mean'"
        )
    dataset = load_pairs(pairs)
    if len(dataset) == 0:
        raise DataError(f"{dataset.name}: no pairs; a detector needs positive/negative pairs")
    same = [i for i, p in enumerate(dataset) if p.positive.strip() == p.negative.strip()]
    if same:
        raise DataError(
            f"{dataset.name}: pairs {same[:5]} have the same text on both sides; each pair "
            "needs a positive (concept present) and a different negative"
        )
    if len({p.positive for p in dataset}) == 1 or len({p.negative for p in dataset}) == 1:
        raise DataError(
            f"{dataset.name}: every pair has the same positive or the same negative text; a "
            "detector needs varied examples of both classes"
        )
    prompted = [i for i, p in enumerate(dataset) if p.prompt is not None]
    if region == "response" and len(prompted) != len(dataset):
        raise ConfigError(
            "region 'response' reads answers: every pair needs a 'prompt' (positive and "
            "negative are two answers to it); for bare prompts use region 'post_instruction'"
        )
    if region != "response" and prompted:
        raise ConfigError(
            f"region {region!r} reads user prompts, but pairs {prompted[:5]} have a 'prompt' "
            "field (answers to it): use --region response, or drop the field"
        )
    if not any(p.split == "test" for p in dataset):
        dataset = _seeded_split(dataset, test_share=0.3)
    held_out = len(dataset.split("test"))
    if held_out < MIN_HELD_OUT:
        raise DataError(
            f"{dataset.name}: {held_out} held-out pairs; calibrating a threshold needs at least "
            f"{MIN_HELD_OUT} held-out negatives: mark more pairs 'split': 'test' or add pairs"
        )
    if len(dataset.split("train")) < MIN_TRAIN:
        raise DataError(
            f"{dataset.name}: {len(dataset.split('train'))} train pairs; give at least {MIN_TRAIN}"
        )
    return dataset


def _seeded_split(dataset: Pairs, test_share: float, seed: int = 0) -> Pairs:
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    test = set(order[: max(1, round(len(order) * test_share))])
    items = tuple(replace(p, split="test" if i in test else "train") for i, p in enumerate(dataset))
    return Pairs(items, name=dataset.name)


def _choose_layers(
    model: Model, train: Pairs, method: str, region: str
) -> tuple[tuple[int, ...], dict[int, float]]:
    """Three consecutive layers with the best mean AUROC on a validation cut of `train`."""
    order = list(range(len(train)))
    random.Random(1).shuffle(order)
    n_val = max(2, len(order) // 4)
    val_idx = torch.tensor(sorted(order[:n_val]))
    fit_idx = torch.tensor(sorted(order[n_val:]))
    candidates = list(range(model.num_layers))
    rows = train_rows(model, train, candidates, region)  # one pass; rows follow `train`
    scores: dict[int, float] = {}
    for layer in candidates:
        pos, neg = rows[layer]
        direction = METHODS[method](pos[fit_idx], neg[fit_idx])
        unit = direction / direction.norm().clamp_min(1e-12)
        scores[layer] = round(auroc(pos[val_idx] @ unit, neg[val_idx] @ unit), 4)
    return best_window(scores, WINDOW), scores


def best_window(scores: dict[int, float], width: int) -> tuple[int, ...]:
    """The `width` consecutive layers of `scores` with the best summed score. Ties (easy
    pairs read perfectly almost everywhere) go to the window nearest the middle of the
    model: the first layers read the words themselves, so a detector there misses the
    concept in other wording (it chose 0-2 on pairs scored 1.0 at every layer, and missed
    a rephrased request that 12-14 caught)."""
    layers = sorted(scores)
    width = min(width, len(layers))
    middle = (len(layers) - width) / 2
    best = max(
        range(len(layers) - width + 1),
        key=lambda s: (sum(scores[x] for x in layers[s : s + width]), -abs(s - middle)),
    )
    return tuple(layers[best : best + width])


def fit_detector(
    model: Model,
    pairs: Pairs | str | Path | Sequence[Any],
    *,
    layers: str | int | Sequence[int] = "auto",
    method: str = "probe",
    region: str = "post_instruction",
    target_fpr: float = 0.05,
    pooling: str = "mean",
    labels: str = "tokens",
) -> DetectorFit:
    """Fit and calibrate a detector; layers ``"auto"`` are chosen on the train split only.

    >>> fit = fit_detector(model, "my_pairs.jsonl")
    >>> fit.heldout_auroc, fit.detector.threshold
    """
    if method not in METHODS or method == "actadd":
        raise ConfigError(f"detector method must be mean_diff, pca or probe, got {method!r}")
    check_target_fpr(target_fpr)
    check_labels(labels)
    dataset = check_detector_pairs(pairs, region, pooling=pooling, method=method)
    train, test = dataset.split("train"), dataset.split("test")
    validation: dict[int, float] = {}
    if layers == "auto":
        chosen, validation = _choose_layers(model, train, method, region)
    else:
        chosen = tuple(parse_layers(model, layers))
    if parse_pooling(pooling):
        detector = train_token_detector(
            model,
            dataset,
            list(chosen),
            pooling=pooling,
            region=region,
            labels=labels,
            target_fpr=target_fpr,
        )
    else:
        detector = train_detector(
            model, dataset, list(chosen), method=method, region=region, target_fpr=target_fpr
        )
    pos, neg = sides(test, region)
    pos_scores = torch.tensor(detector.score(model, pos), dtype=torch.float64)
    neg_scores = torch.tensor(detector.score(model, neg), dtype=torch.float64)
    fit = DetectorFit(
        detector=detector,
        layers=chosen,
        validation_auroc=validation,
        heldout_auroc=round(auroc(pos_scores, neg_scores), 4),
        heldout_positive_flagged=float((pos_scores > detector.threshold).double().mean()),
        heldout_negative_flagged=float((neg_scores > detector.threshold).double().mean()),
        train_pairs=len(train),
        heldout_pairs=len(test),
    )
    meta = dict(detector.directions.metadata)
    meta["training"] = {
        "layers": "auto (best 3 consecutive by validation AUROC)" if validation else "given",
        "target_fpr": target_fpr,
        "pooling": pooling,
        **({"labels": labels} if parse_pooling(pooling) else {}),
        **fit.summary(),
    }
    directions = SteeringVector(dict(detector.directions.directions), meta)
    return replace(fit, detector=replace(detector, directions=directions))
