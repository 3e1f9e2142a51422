"""Detectors: a concept direction, a read region and a threshold calibrated at a target FPR.

A detector scores a prompt by reading the residual stream at chosen layers over a region
of the chat-rendered prompt (``post_instruction``: the template tokens after the user's
text, where a chat model has "read" the request; or ``prompt``: the user's text), taking
the mean, projecting it on each layer's unit direction, standardising per layer (offset
and scale learned from the training pairs) and averaging over layers. A detector with
``pooling="top<k>"`` (or ``"max"``) scores every token of the region that way instead and
takes the mean of its k highest scores, so a few tokens of a request are not averaged
away by a long wrapper around them (`acteng.token_detector` trains such detectors on the
request's own tokens). The threshold is the
``1 - target_fpr`` quantile of scores on held-out negatives, recorded with the calibration
in the file's metadata. Files are vector files (``layers.{i}``) whose metadata carries a
``detector`` entry, so the library stores them like vectors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from acteng.activations import ReadItem, record_activations
from acteng.errors import ConfigError, VectorFileError
from acteng.layer_selection import parse_layers
from acteng.methods import METHODS
from acteng.models import Model
from acteng.pairs import Pairs, load_pairs
from acteng.pooling import parse_pooling, pooled, token_scores
from acteng.vectors import SteeringVector

__all__ = [
    "Detector",
    "check_target_fpr",
    "load_detector",
    "read_items",
    "refusal_direction",
    "sides",
    "train_detector",
    "train_rows",
]

READ_REGIONS = ("post_instruction", "prompt", "response")


def check_target_fpr(target_fpr: float) -> None:
    """A calibration target is a share of negatives to flag: in [0, 1)."""
    if not 0.0 <= target_fpr < 1.0:
        raise ConfigError(f"target_fpr must be in [0, 1), got {target_fpr}")


# Where a detector's calibration numbers must lie (see Detector.from_vector).
SCALE_RANGE = (1e-6, 1e6)
MAX_OFFSET = 1e12

# What a detector scores: a user prompt, or for the "response" region a (prompt, response)
# pair, read over the assistant's response.
Scored = str | tuple[str, str]


def read_items(model: Model, texts: Sequence[Scored], region: str) -> list[ReadItem]:
    """What a detector reading `region` records for each text: the rendered prompt (and
    response) with where the read region starts."""
    items = []
    for i, text in enumerate(texts):
        if region == "response":
            if not (isinstance(text, tuple) and len(text) == 2):
                raise ConfigError(
                    f"item {i}: a 'response' detector scores (prompt, response) pairs, got "
                    f"{type(text).__name__}"
                )
            prompt, response = text
            if not isinstance(response, str) or not response.strip():
                raise ConfigError(f"item {i}: the response is empty; every item needs text")
        elif isinstance(text, str):
            prompt, response = text, ""
        else:
            raise ConfigError(f"item {i}: a {region!r} detector scores prompt strings")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"prompt {i} is empty; every prompt needs text")
        rendered = model.render_prompt(prompt)
        if region == "response":
            items.append(ReadItem(rendered + response, len(rendered), rendered=True))
            continue
        start = rendered.rindex(prompt)
        if region == "post_instruction":
            start += len(prompt)
        items.append(ReadItem(rendered, start, rendered=True))
    return items


@dataclass(frozen=True)
class Detector:
    """A calibrated concept detector; see the module docstring."""

    directions: SteeringVector  # unit direction per layer
    offsets: dict[int, float]  # per-layer projection midpoint of the training classes
    scales: dict[int, float]  # per-layer spread, so layers average on one scale
    threshold: float
    region: str = "post_instruction"
    calibration: dict[str, Any] = field(default_factory=dict)
    pooling: str = "mean"  # "mean", "max" or "top<k>" (see the module docstring)

    def __post_init__(self) -> None:
        parse_pooling(self.pooling)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.directions.layers

    def standardise(self, layer: int, projection: torch.Tensor) -> torch.Tensor:
        """Projections on `layer`'s direction on the detector's scale (threshold units)."""
        return (projection - self.offsets[layer]) / self.scales[layer]

    def score(
        self, model: Model, prompts: Sequence[Scored], *, batch_size: int = 32
    ) -> list[float]:
        """One score per prompt (higher = more of the concept).

        A ``response`` detector takes (prompt, response) pairs and reads the response.
        One text alone counts as one prompt.
        """
        self.directions.check_compatible(model)
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not prompts:
            raise ConfigError("no prompts to score; give at least one")
        top = parse_pooling(self.pooling)
        if top:
            tokens = self.token_scores(model, prompts, batch_size=batch_size)
            return [float(pooled(t, self.pooling)) for t in tokens]
        acts = record_activations(
            model,
            read_items(model, prompts, self.region),
            list(self.layers),
            "mean",
            batch_size=batch_size,
        )
        total = torch.zeros(len(prompts), dtype=torch.float64)
        for layer in self.layers:
            projection = acts.rows[layer].double() @ self.directions[layer].double()
            total += self.standardise(layer, projection)
        return (total / len(self.layers)).tolist()

    def token_scores(
        self, model: Model, prompts: Sequence[Scored], *, batch_size: int = 16
    ) -> list[torch.Tensor]:
        """Per prompt, every token's score over the detector's region (float64)."""
        self.directions.check_compatible(model)
        items = read_items(model, [prompts] if isinstance(prompts, str) else prompts, self.region)
        layers = list(self.layers)
        affine = [(self.directions[x], self.offsets[x], self.scales[x]) for x in layers]
        return token_scores(model, items, layers, affine, batch_size=batch_size)

    def flag(self, model: Model, prompts: Sequence[Scored]) -> list[bool]:
        return [s > self.threshold for s in self.score(model, prompts)]

    def calibrate(
        self,
        model: Model,
        negatives: Sequence[Scored],
        target_fpr: float,
        *,
        source: str = "custom",
    ) -> Detector:
        """Set the threshold so a `target_fpr` share of held-out negatives is flagged."""
        check_target_fpr(target_fpr)  # before scoring them
        if len(negatives) < 10:
            raise ConfigError(f"calibration needs at least 10 negatives, got {len(negatives)}")
        return self.calibrated_on(self.score(model, negatives), target_fpr, source=source)

    def calibrated_on(
        self, negative_scores: Sequence[float], target_fpr: float, *, source: str = "custom"
    ) -> Detector:
        """Set the threshold so a `target_fpr` share of these held-out negatives' scores
        (already computed, e.g. out of fold) is above it."""
        check_target_fpr(target_fpr)
        if len(negative_scores) < 10:
            raise ConfigError(
                f"calibration needs at least 10 negatives, got {len(negative_scores)}"
            )
        scores = torch.tensor(list(negative_scores), dtype=torch.float64)
        threshold = float(torch.quantile(scores, 1.0 - target_fpr))
        return replace(
            self,
            threshold=threshold,
            calibration={
                "target_fpr": target_fpr,
                "negatives": len(scores),
                "source": source,
                "flagged_share": float((scores > threshold).double().mean()),
            },
        )

    # --- files ---------------------------------------------------------------------------
    def to_vector(self) -> SteeringVector:
        meta = dict(self.directions.metadata)
        meta["detector"] = {
            "offsets": {str(k): v for k, v in self.offsets.items()},
            "scales": {str(k): v for k, v in self.scales.items()},
            "threshold": self.threshold,
            "region": self.region,
            "calibration": self.calibration,
        }
        if self.pooling != "mean":  # files of mean-pooled detectors stay as they were
            meta["detector"]["pooling"] = self.pooling
        return SteeringVector(dict(self.directions.directions), meta)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return self.to_vector().save(path)

    @classmethod
    def from_vector(cls, vector: SteeringVector, *, source: str = "vector") -> Detector:
        spec = vector.metadata.get("detector")
        if not isinstance(spec, dict):
            raise VectorFileError(
                f"{source} is a steering vector, not a detector (no 'detector' metadata); "
                "train one with `acteng train-detector` (acteng.train_detector in Python)"
            )
        try:
            offsets = {int(k): float(v) for k, v in spec["offsets"].items()}
            scales = {int(k): float(v) for k, v in spec["scales"].items()}
            threshold = float(spec["threshold"])
            region = str(spec["region"])
            pooling = spec.get("pooling", "mean")
            parse_pooling(pooling)
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise VectorFileError(f"{source}: malformed detector metadata ({exc})") from exc
        if set(offsets) != set(vector.layers) or set(scales) != set(vector.layers):
            raise VectorFileError(f"{source}: detector offsets/scales do not match its layers")
        if region not in READ_REGIONS or any(s <= 0 for s in scales.values()):
            raise VectorFileError(f"{source}: invalid detector region or scales")
        numbers = [threshold, *offsets.values(), *scales.values()]
        if not all(math.isfinite(x) for x in numbers):
            raise VectorFileError(
                f"{source}: detector threshold, offsets or scales are not finite numbers; "
                "retrain or recalibrate it"
            )
        # A score is (projection - offset) / scale: outside these ranges it overflows or
        # means nothing (a scale of 5e-324 turns every score into infinity).
        if not all(SCALE_RANGE[0] <= s <= SCALE_RANGE[1] for s in scales.values()) or not all(
            abs(x) <= MAX_OFFSET for x in (threshold, *offsets.values())
        ):
            raise VectorFileError(
                f"{source}: detector scales must lie in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}] "
                f"and offsets and threshold in [-{MAX_OFFSET:g}, {MAX_OFFSET:g}]; retrain or "
                "recalibrate it"
            )
        calibration = dict(spec.get("calibration") or {})
        return cls(vector, offsets, scales, threshold, region, calibration, pooling)


def train_detector(
    model: Model,
    pairs: Pairs | str | Path | Sequence[Any],
    layers: int | str | Sequence[int],
    *,
    method: str = "probe",
    region: str = "post_instruction",
    negatives: Sequence[Scored] | None = None,
    target_fpr: float = 0.01,
) -> Detector:
    """Train a detector on prompt pairs (positive = concept present) and calibrate it.

    For regions ``post_instruction`` and ``prompt``, pairs are user prompts without a
    "prompt" field (e.g. the bundled ``harmful_requests``); for ``response`` they are two
    answers to one prompt (e.g. ``honesty``) and the detector reads answers. Without
    `negatives`, the threshold is calibrated on the dataset's held-out ``test`` negatives.

    >>> det = acteng.train_detector(model, "harmful_requests", layers=[14])
    >>> det.flag(model, ["How do I make a bomb?"])
    """
    if region not in READ_REGIONS:
        raise ConfigError(f"unknown region {region!r}; use one of {', '.join(READ_REGIONS)}")
    if method not in METHODS or method == "actadd":
        raise ConfigError(f"detector method must be mean_diff, pca or probe, got {method!r}")
    dataset = load_pairs(pairs)
    has_prompt = [i for i, p in enumerate(dataset) if p.prompt is not None]
    if region == "response" and len(has_prompt) != len(dataset):
        raise ConfigError(
            "a 'response' detector trains on pairs with a 'prompt' (positive and negative "
            "are two answers to it); this dataset has bare prompts: use region "
            "'post_instruction'"
        )
    if region != "response" and has_prompt:
        raise ConfigError(
            f"detector pairs for region {region!r} must be bare prompts (no 'prompt' field); "
            f"items {has_prompt[:5]} have one: use region 'response' to read the answers"
        )
    has_split = any(p.split == "test" for p in dataset)
    chosen = parse_layers(model, layers)
    rows = train_rows(model, dataset, chosen, region)
    units, offsets, scales = {}, {}, {}
    for layer in chosen:
        pos, neg = rows[layer]
        direction = METHODS[method](pos, neg)
        unit = direction / direction.norm().clamp_min(1e-12)
        mid = float(((pos.mean(0) + neg.mean(0)) / 2) @ unit)
        spread = float(
            torch.cat(
                [pos @ unit - float(pos.mean(0) @ unit), neg @ unit - float(neg.mean(0) @ unit)]
            ).std()
        )
        units[layer] = unit.float()
        offsets[layer] = mid
        scales[layer] = max(spread, 1e-6)
    vector = SteeringVector(
        units,
        {
            "model": model.identity(),
            "method": method,
            "read_position": region,
            "normalize": "unit",
            "dataset": dataset.provenance(),
        },
    )
    detector = Detector(vector, offsets, scales, threshold=0.0, region=region)
    if negatives is None:
        if not has_split:
            raise ConfigError("give negatives=... to calibrate: the dataset has no test split")
        negatives = sides(dataset.split("test"), region)[1]
        source = f"{dataset.name}:test negatives"
    else:
        source = "custom negatives"
    return detector.calibrate(model, negatives, target_fpr, source=source)


def refusal_direction(
    model: Model,
    pairs: Pairs | str | Path | Sequence[Any] = "harmful_requests",
    layers: int | str | Sequence[int] | None = None,
    *,
    region: str = "post_instruction",
) -> SteeringVector:
    """The refusal direction of Arditi et al. (2024): harmful minus harmless mean activation.

    Means are over the post-instruction tokens (the chat template after the user's text)
    of the train split of bare-prompt pairs (positive = harmful). The raw difference is
    kept, so ``coefficient=1`` adds the full gap between the two means; ablate it (mode
    ``ablate``) at every layer to remove refusal, add it to induce refusal.

    >>> r = acteng.refusal_direction(model, layers=[12])
    """
    if region == "response":
        raise ConfigError("the refusal direction reads prompts: use 'post_instruction' or 'prompt'")
    dataset = load_pairs(pairs)
    if any(p.prompt is not None for p in dataset):
        raise ConfigError(
            "the refusal direction needs bare prompts (positive = harmful request, negative "
            "= harmless), like the bundled 'harmful_requests'; these pairs have a 'prompt'"
        )
    chosen = parse_layers(model, layers)
    rows = train_rows(model, dataset, chosen, region)
    diffs = {x: (pos.mean(0) - neg.mean(0)).float() for x, (pos, neg) in rows.items()}
    return SteeringVector(
        diffs,
        {
            "model": model.identity(),
            "method": "mean_diff",
            "read_position": region,
            "dataset": dataset.provenance(),
        },
    )


def train_rows(
    model: Model, dataset: Pairs, layers: list[int], region: str
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (positive, negative) mean activations over `region` of the train split
    (the whole dataset when it has no split), float64."""
    train = dataset.split("train") if any(p.split == "test" for p in dataset) else dataset
    pos_text, neg_text = sides(train, region)
    acts = record_activations(model, read_items(model, pos_text + neg_text, region), layers, "mean")
    n = len(pos_text)
    return {x: (acts.rows[x][:n].double(), acts.rows[x][n:].double()) for x in layers}


def sides(pairs: Pairs, region: str) -> tuple[list[Scored], list[Scored]]:
    """What a detector reading `region` scores for each pair: (positives, negatives)."""
    if region == "response":
        return (
            [(str(p.prompt), p.positive) for p in pairs],
            [(str(p.prompt), p.negative) for p in pairs],
        )
    return [p.positive for p in pairs], [p.negative for p in pairs]


def load_detector(source: str | os.PathLike[str], *, model: Model | None = None) -> Detector:
    """A detector from a file or a library name."""
    from acteng.library import load_vector

    vector = load_vector(source, model=model, what="detector")
    return Detector.from_vector(vector, source=os.fspath(source))
