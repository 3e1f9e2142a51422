"""Token-level detectors: trained on the request's own tokens, read with top-k pooling.

A mean-pooled detector (`acteng.detectors.train_detector`) learns from each prompt's mean
activation. Wrap harmful and harmless requests in the same jailbreak framing (role-play,
fiction, a long chatty preamble) and that mean is mostly the wrapper: the detector then
reads the wrapper, flagging harmless role-play and missing wrapped harmful requests.

`train_token_detector` trains on single tokens instead. For each pair, the positive's
tokens inside the characters where it differs from its negative (the request, when the
two sides share a wrapper) are the positive class; every token of the negative, and the
positive's shared wrapper tokens, are the negative class. One logistic probe over the
concatenated layers (class-balanced, L2-penalised on standardised features) scores each
token; a prompt's score is the mean of its k highest token scores (``pooling="top<k>"``),
so the request is read wherever it sits. The probe is stored as an ordinary detector
(per-layer unit directions, offsets and scales whose layer average equals the probe's
logit), so monitors, guards and servers read its per-token scores unchanged.

Pairs should be matched (same wrapper, different request) for the labels to pick out the
request; for unmatched pairs the differing span is most of the positive, which still works.
`clean` texts, with no pair, hold nothing to flag: all their tokens join the negative class
(with ``labels="sequence"``, their mean rows do).
They teach the probe what it must not read as the concept when the pairs never show it (a
prompt-injection detector trained on documents alone reads a user's own role-play or
"ignore your rules" framing as an injection; the user's request is not a document).

With ``labels="sequence"`` the same probe is fitted on each prompt's mean activation over
the region (positive or negative as a whole) instead, and read per token with the pooling
asked for: ``"mean+max"`` scores a prompt by its mean plus its highest token, which is how
the bundled ``harmful_request`` detector reads wrapped requests (see `acteng.pooling`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from acteng.activations import (
    ReadItem,
    record_activations,
    record_token_matrix,
    record_tokens,
    token_offsets,
)
from acteng.detectors import SCALE_RANGE, Detector, check_target_fpr, read_items, sides
from acteng.errors import ConfigError
from acteng.held_out import group_folds, validation_cut
from acteng.layer_selection import parse_layers
from acteng.methods import fit_logistic
from acteng.models import Model
from acteng.pairs import ContrastivePair, Pairs, load_pairs
from acteng.pooling import parse_pooling, pooled
from acteng.vectors import SteeringVector

__all__ = [
    "clean_texts_provenance",
    "differing_span",
    "group_folds",
    "token_labels",
    "train_token_detector",
    "validation_cut",
]

TOKEN_REGIONS = ("prompt",)
LABELS = ("tokens", "sequence")  # what the probe is fitted on; see train_token_detector
CALIBRATIONS = ("test", "validation", "crossfit")  # where the threshold comes from
FOLDS = 4  # cross-fitting folds: each fold's probe sees 75 % of the pairs, as "validation"'s


def check_labels(labels: str) -> None:
    if labels not in LABELS:
        raise ConfigError(f"labels must be one of {LABELS}, got {labels!r}")


def differing_span(text: str, other: str) -> tuple[int, int]:
    """The characters [start, end) of `text` that differ from `other` (after their
    common prefix and before their common suffix)."""
    limit = min(len(text), len(other))
    start = 0
    while start < limit and text[start] == other[start]:
        start += 1
    tail = 0
    while tail < limit - start and text[-1 - tail] == other[-1 - tail]:
        tail += 1
    return start, len(text) - tail


def token_labels(
    model: Model, pairs: Sequence[ContrastivePair], items: Sequence[ReadItem]
) -> list[torch.Tensor]:
    """Per read item (`read_items` of the pairs' positives, then their negatives, then
    any clean texts), 1 for a positive's tokens that overlap the characters where it
    differs from its negative, else 0."""
    labels = []
    for i, offsets in enumerate(token_offsets(model, items)):
        if i >= len(pairs):
            labels.append(torch.zeros(len(offsets)))
            continue
        lo, hi = differing_span(pairs[i].positive, pairs[i].negative)
        labels.append(torch.tensor([1.0 if b > lo and a < hi else 0.0 for a, b in offsets]))
    return labels


def _as_detector(
    w: torch.Tensor, b: float, layers: list[int], d: int, region: str, pooling: str
) -> Detector:
    """The probe logit ``sum_l w_l . h_l + b`` as a detector: the layer average of
    ``(h_l . u_l - offset_l) / scale_l`` with u_l = w_l / |w_l|, scale_l = 1 / (L |w_l|)
    and offset_l = -b / (L |w_l|) is exactly that logit."""
    n = len(layers)
    units, offsets, scales = {}, {}, {}
    for i, layer in enumerate(layers):
        part = w[i * d : (i + 1) * d]
        norm = float(part.norm())
        scale = 1.0 / (n * norm) if norm > 0 else float("inf")
        if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
            raise ConfigError(
                f"the token probe gives layer {layer} no usable weight (norm {norm:.3g}); "
                "drop that layer or lower l2"
            )
        units[layer] = (part / norm).float()
        scales[layer] = scale
        offsets[layer] = -b * scale
    vector = SteeringVector(units, {})
    return Detector(vector, offsets, scales, threshold=0.0, region=region, pooling=pooling)


def train_token_detector(
    model: Model,
    pairs: Pairs | str | Path | Sequence[Any],
    layers: int | str | Sequence[int],
    *,
    pooling: str = "top8",
    region: str = "prompt",
    labels: str = "tokens",
    l2: float = 1000.0,
    steps: int = 200,
    target_fpr: float = 0.05,
    calibrate_on: str = "test",
    seed: int = 0,
    batch_size: int = 16,
    clean: Sequence[str] = (),
) -> Detector:
    """Train a token-level detector on bare prompt pairs; see the module docstring.

    `labels` is what the probe is fitted on: ``"tokens"`` (the positive's differing
    tokens against everything else) or ``"sequence"`` (each prompt's mean activation,
    labelled by its side); either way it scores every token and pools as `pooling` says.

    The threshold is calibrated on held-out negatives: the pairs' ``test`` split
    (`calibrate_on="test"`), or, leaving the test split untouched for measuring, a seeded
    25 % of the train pairs kept out of fitting (``"validation"``) or every train negative
    scored out of fold (``"crossfit"``: four folds, each scored by a probe fitted on the
    other three; the probe kept is fitted on all the train pairs, so it sees a third more
    data and the threshold rests on four times the negatives). Held-out pairs go in whole
    groups that share a document or wrapper (`acteng.held_out`).

    `clean` texts (see the module docstring) are fitted as negatives throughout; they are
    not used to calibrate, so the threshold still holds the false-positive rate on the
    pairs' own kind of negative.

    >>> det = acteng.train_token_detector(model, "harmful_requests", layers=[8, 12, 16])
    """
    if region not in TOKEN_REGIONS:
        raise ConfigError(
            f"token-level detectors read the user's prompt tokens: region must be one of "
            f"{TOKEN_REGIONS}, got {region!r}"
        )
    if parse_pooling(pooling) == 0:
        raise ConfigError(
            "a token-level detector pools token scores: use 'max', 'top<k>', 'mean+max' or "
            "'mean+top<k>'"
        )
    check_labels(labels)
    if calibrate_on not in CALIBRATIONS:
        raise ConfigError(f"calibrate_on must be one of {CALIBRATIONS}, got {calibrate_on!r}")
    check_target_fpr(target_fpr)
    if l2 < 0 or steps < 1:
        raise ConfigError(f"l2 must be >= 0 and steps >= 1, got l2={l2}, steps={steps}")
    dataset = load_pairs(pairs)
    prompted = [i for i, p in enumerate(dataset) if p.prompt is not None]
    if prompted:
        raise ConfigError(
            f"token-level detectors train on bare prompts (no 'prompt' field); items "
            f"{prompted[:5]} have one"
        )
    same = [i for i, p in enumerate(dataset) if p.positive.strip() == p.negative.strip()]
    if same:
        raise ConfigError(f"pairs {same[:5]} have the same text on both sides")
    has_test = any(p.split == "test" for p in dataset)
    train = dataset.split("train") if has_test else dataset
    folds: list[int] = []
    if calibrate_on == "validation":
        train, held = validation_cut(train, 0.25, seed)
        negatives = sides(held, region)[1]
        source = (
            f"{dataset.name}: seeded 25 % of the train negatives (whole documents), "
            "kept out of fitting"
        )
    elif calibrate_on == "crossfit":
        folds = group_folds(train, FOLDS, seed)
        source = (
            f"{dataset.name}: out-of-fold scores of every train negative ({FOLDS} seeded "
            "folds of whole documents; the shipped probe is refitted on all of them)"
        )
    else:
        if not has_test:
            raise ConfigError(
                "the pairs have no 'test' split to calibrate on: mark some 'split': 'test' "
                "or use calibrate_on='validation'"
            )
        negatives = sides(dataset.split("test"), region)[1]
        source = f"{dataset.name}:test negatives"
    if len(train) < 4:
        raise ConfigError(f"{len(train)} pairs to fit on; give at least 4")
    held_out = len(train) if folds else len(negatives)
    if held_out < 10:  # Detector.calibrate's minimum, checked before any recording
        raise ConfigError(
            f"{held_out} negatives to calibrate on ({calibrate_on!r}); give at least 10 "
            "(more train pairs, or another calibrate_on)"
        )
    if isinstance(clean, str) or not all(isinstance(t, str) for t in clean):
        raise ConfigError("clean must be a list of texts (strings), not one string")
    extra = _distinct_texts(clean)
    positives = {p.positive for p in dataset}
    colliding = [i for i, t in enumerate(extra) if t in positives]
    if colliding:
        raise ConfigError(
            f"clean texts {colliding[:5]} are also positives of the pairs, so they would be "
            "both flagged and clean; remove them from clean"
        )
    chosen = parse_layers(model, layers)
    texts = [p.positive for p in train] + [p.negative for p in train] + extra
    items = read_items(model, texts, region)
    fitter = _Fitter(model, list(train), items, chosen, labels, l2, steps, batch_size)
    out_of_fold: list[float] = []
    for k in range(FOLDS if folds else 0):  # before the final fit, which may consume the recording
        kept = [i for i, f in enumerate(folds) if f != k]
        left_out = [len(train) + i for i, f in enumerate(folds) if f == k]
        out_of_fold += fitter.pooled_scores(fitter.fit(kept), left_out, pooling)
    w, b = fitter.fit(range(len(train)), last=True)
    detector = _as_detector(w, b, chosen, model.hidden_size, region, pooling)
    vector = SteeringVector(
        dict(detector.directions.directions),
        {
            "model": model.identity(),
            "method": "token_probe",
            "read_position": region,
            "normalize": "unit",
            "dataset": dataset.provenance(),
            **({"clean_texts": clean_texts_provenance(extra)} if extra else {}),
            "token_probe": {
                "l2": l2,
                "steps": steps,
                "pooling": pooling,
                "labels": labels,
                "seed": seed,
                "calibrate_on": calibrate_on,
            },
        },
    )
    detector = replace(detector, directions=vector)
    if not folds:
        return detector.calibrate(model, negatives, target_fpr, source=source)
    return detector.calibrated_on(out_of_fold, target_fpr, source=source)


class _Fitter:
    """The probe `train_token_detector` fits, on any subset of its pairs (every clean text
    always joins), from one recording of the items: positives, negatives, clean texts."""

    def __init__(
        self,
        model: Model,
        pairs: list[ContrastivePair],
        items: list[ReadItem],
        layers: list[int],
        labels: str,
        l2: float,
        steps: int,
        batch_size: int,
    ) -> None:
        self.n, self.items, self.labels, self.l2, self.steps = len(pairs), items, labels, l2, steps
        self.model, self.layers, self.batch_size = model, layers, batch_size
        # every token's activations in one matrix, item i's rows from offsets[i] to
        # offsets[i + 1], written in place as they are recorded: the fits read it without
        # holding per-item pieces beside it (the bundled prompt_injection rebuild, a
        # quarter of a million tokens, once ran out of 24 GiB that way)
        self.tokens = torch.empty(0)
        self.offsets: list[int] = []
        if labels == "sequence":
            means = record_activations(model, items, layers, "mean", batch_size=batch_size)
            # float64: one row per prompt is cheap, and float32 sums in a different order
            # with another thread count, which moves the fitted probe (and the bundled file)
            self.rows = torch.cat([means.rows[layer].double() for layer in layers], dim=1)
        else:
            self.tokens, self.offsets = record_token_matrix(
                model, items, layers, batch_size=batch_size
            )
            self.token_y = token_labels(model, pairs, items)

    def fit(self, pair_ids: Sequence[int], *, last: bool = False) -> tuple[torch.Tensor, float]:
        """The probe fitted on these pairs (both sides) and every clean text. `last`: no
        fit or score follows, so a fit on every item may standardise the recording itself
        rather than a copy of it (a fit on a subset always works on its own copy)."""
        keep = [*pair_ids, *(self.n + i for i in pair_ids), *range(2 * self.n, len(self.items))]
        if self.labels == "sequence":
            x = self.rows[keep]  # [kept items, L * d], a copy
            y = torch.tensor([1.0 if i < self.n else 0.0 for i in keep], dtype=torch.float64)
            overwrite = True
        else:
            y = torch.cat([self.token_y[i] for i in keep])
            if keep == list(range(len(self.items))):
                x, overwrite = self.tokens, last  # [tokens, L * d]
                if last:
                    self.tokens = torch.empty(0)  # standardised below: no longer the recording
            else:
                x, overwrite = torch.cat([self._rows(i) for i in keep]), True
        if y.sum() == 0:
            raise ConfigError("no positive tokens: every positive equals its negative")
        weight = (len(y) - y.sum()) / y.sum()
        return fit_logistic(
            x, y, l2=self.l2, steps=self.steps, positive_weight=weight, overwrite=overwrite
        )

    def pooled_scores(
        self, probe: tuple[torch.Tensor, float], item_ids: list[int], pooling: str
    ) -> list[float]:
        """Each item's pooled score under the probe's logit (what its detector would give)."""
        w, b = probe[0].double(), probe[1]
        if self.offsets:
            per_item = [self._rows(i) for i in item_ids]
        else:
            chosen = [self.items[i] for i in item_ids]
            rows = record_tokens(self.model, chosen, self.layers, batch_size=self.batch_size)
            per_item = [r.flatten(1) for r in rows]
        return [float(pooled(t.double() @ w + b, pooling)) for t in per_item]

    def _rows(self, item: int) -> torch.Tensor:
        if not len(self.tokens):
            raise RuntimeError("the recording was standardised by the last fit; fit last")
        return self.tokens[self.offsets[item] : self.offsets[item + 1]]


def clean_texts_provenance(texts: Sequence[str]) -> dict[str, Any]:
    """What a detector file records of the clean texts it was fitted with: their number
    and a hash of them, in order, blank and repeated texts dropped as `train_token_detector`
    drops them (so the record of a recipe's texts can be computed without a model)."""
    kept = _distinct_texts(texts)
    digest = hashlib.sha256("\n\0".join(kept).encode()).hexdigest()
    return {"count": len(kept), "sha256": digest}


def _distinct_texts(texts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(t for t in texts if t.strip()))
