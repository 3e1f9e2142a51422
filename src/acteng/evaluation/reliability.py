"""How reliably a vector steers, example by example (after Tan et al. 2024).

- `steerability`: each example's propensity (the log-probability margin of its positive
  over its negative answer, `acteng.evaluation.metrics.logprob_margin`; for A/B items this is the
  logit of p(match)) is measured at several coefficients, and its least-squares slope
  against the coefficient is that example's steerability. Reported with the mean, the
  spread (standard deviation) and the share of anti-steerable examples (slope < 0).
- `pair_diagnostics`, before any steering: how consistent the per-pair activation
  differences are (mean cosine of each pair's difference with the mean difference, which
  Tan et al. found predicts steerability) and how well the direction separates positives
  from negatives (AUROC and Cohen's d of their projections).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from acteng.activations import record_pairs
from acteng.errors import ConfigError
from acteng.evaluation.metrics import auroc, logprob_margin
from acteng.layer_selection import parse_layers
from acteng.models import Model
from acteng.pairs import ContrastivePair
from acteng.steering.spec import SteeringSpec
from acteng.vectors import SteeringVector

__all__ = ["PairDiagnostics", "Steerability", "pair_diagnostics", "steerability"]


@dataclass(frozen=True)
class Steerability:
    """Per-example slopes of propensity against the coefficient, and their summary."""

    coefficients: tuple[float, ...]
    propensities: list[list[float]]  # [example][coefficient]
    slopes: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.slopes)

    @property
    def spread(self) -> float:
        return statistics.pstdev(self.slopes)

    @property
    def anti_steerable(self) -> float:
        """Share of examples whose propensity falls as the coefficient rises."""
        return sum(s < 0 for s in self.slopes) / len(self.slopes)

    def to_json(self) -> dict[str, object]:
        return {
            "coefficients": list(self.coefficients),
            "mean_slope": self.mean,
            "spread": self.spread,
            "anti_steerable": self.anti_steerable,
            "slopes": self.slopes,
        }


def steerability(
    model: Model,
    pairs: Sequence[ContrastivePair],
    vector: SteeringVector,
    coefficients: Sequence[float] = (-2.0, -1.0, 0.0, 1.0, 2.0),
    *,
    layers: Sequence[int] | None = None,
) -> Steerability:
    """Steerability of each pair (with a prompt) under `vector` at `coefficients`."""
    grid = tuple(float(c) for c in coefficients)
    if len(set(grid)) < 2:
        raise ConfigError("steerability needs at least two different coefficients")
    columns = []
    for c in grid:
        spec = SteeringSpec(vector, coefficient=c, layers=tuple(layers) if layers else None)
        columns.append(logprob_margin(model, pairs, spec if c != 0.0 else None))
    rows = [list(values) for values in zip(*columns, strict=True)]
    mean_c = statistics.fmean(grid)
    var_c = sum((c - mean_c) ** 2 for c in grid)
    slopes = []
    for row in rows:
        mean_y = statistics.fmean(row)
        slopes.append(
            sum((c - mean_c) * (y - mean_y) for c, y in zip(grid, row, strict=True)) / var_c
        )
    return Steerability(grid, rows, slopes)


@dataclass(frozen=True)
class PairDiagnostics:
    """Pre-steering diagnostics of a dataset at one layer."""

    layer: int
    consistency: float  # mean cosine of per-pair differences with their mean
    auroc: float  # positives vs negatives projected on the mean difference
    cohens_d: float

    def to_json(self) -> dict[str, float]:
        return {
            "layer": self.layer,
            "consistency": self.consistency,
            "auroc": self.auroc,
            "cohens_d": self.cohens_d,
        }


def pair_diagnostics(
    model: Model,
    pairs: Sequence[ContrastivePair],
    layers: int | str | Sequence[int],
    *,
    position: str = "last",
) -> list[PairDiagnostics]:
    """Consistency and separation of `pairs` at each of `layers` (one forward pass)."""
    items = list(pairs)
    if len(items) < 2:
        raise ConfigError("pair diagnostics need at least 2 pairs")
    chosen = parse_layers(model, layers)
    positives, negatives = record_pairs(model, items, chosen, position)
    out = []
    for layer in chosen:
        pos, neg = positives[layer], negatives[layer]
        diffs = pos - neg
        mean = diffs.mean(0)
        consistency = float(torch.nn.functional.cosine_similarity(diffs, mean[None], dim=-1).mean())
        unit = mean / mean.norm().clamp_min(1e-12)
        p, q = pos @ unit, neg @ unit
        pooled = float(torch.sqrt((p.var() + q.var()) / 2).clamp_min(1e-12))
        out.append(
            PairDiagnostics(layer, consistency, auroc(p, q), float(p.mean() - q.mean()) / pooled)
        )
    return out
