"""Reading concepts token by token: how strongly activations align with a vector.

For each token and chosen layer the score is the ``projection`` of the residual stream on
the unit direction (``h . v̂``) or its ``cosine`` with it; the aggregate is the mean over
the chosen layers. `score_tokens` scores given texts in one forward pass each batch;
`monitor` records scores during any forward calls (``model.hf.generate`` included) for
prompt and generated tokens alike, reading positions from the same `ForwardContext` that
steering uses, so left padding and the KV cache are handled.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch

from acteng.activations import right_padded
from acteng.detectors import Detector
from acteng.errors import ConfigError
from acteng.hooks import BlockFn, ForwardContext, hooked, run_until
from acteng.layer_selection import parse_layers
from acteng.models import Model
from acteng.vectors import SteeringVector

__all__ = ["LayerMeans", "Monitor", "Readout", "TokenScores", "monitor", "score_tokens"]

Metric = Literal["projection", "cosine"]
METRICS = ("projection", "cosine")


def _mean_over_layers(per_layer: dict[int, list[float]]) -> list[float]:
    columns = list(per_layer.values())
    return [sum(col) / len(columns) for col in zip(*columns, strict=True)]


@dataclass(frozen=True)
class TokenScores:
    """Per-token concept scores of one text."""

    token_ids: list[int]
    tokens: list[str]
    per_layer: dict[int, list[float]]  # layer -> one score per token
    metric: str

    @property
    def aggregate(self) -> list[float]:
        """Mean over layers, one value per token."""
        return _mean_over_layers(self.per_layer)

    def to_json(self) -> dict[str, object]:
        return {
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "metric": self.metric,
            "per_layer": {str(k): v for k, v in self.per_layer.items()},
            "aggregate": self.aggregate,
        }


@dataclass(frozen=True)
class Readout:
    """How a vector or detector is read token by token: the one readout of acteng.

    `units` holds the unit direction of each read layer on the model's device and dtype;
    a detector's readings are its standardised projections ``(h . v̂ - offset) / scale``,
    so their mean over layers is on the scale of its threshold. `monitor`, `score_tokens`,
    the guard, the server's eager readout and its compiled `MonitorTable` all read
    through this value, so they score the same thing.

    >>> readout = Readout.of(model, detector)
    >>> readout.per_token(layer, hidden)   # [batch, q] float64 on the CPU
    """

    units: dict[int, torch.Tensor]  # layer -> [d_model] unit direction
    detector: Detector | None = None

    @classmethod
    def of(
        cls, model: Model, source: SteeringVector | Detector, layers: Sequence[int] | None = None
    ) -> Readout:
        """Unit directions of `source` at `layers` (default: all of its layers), checked."""
        detector = source if isinstance(source, Detector) else None
        vector = source.directions if isinstance(source, Detector) else source
        chosen = list(vector.layers) if layers is None else list(layers)
        vector.check_compatible(model)
        missing = [x for x in chosen if x not in vector.directions]
        if missing:
            raise ConfigError(
                f"the vector has no layer(s) {missing} (it has {list(vector.layers)}); monitor "
                "layers the vector was made for"
            )
        # in float64: a float32 norm overflows to inf for huge vectors, making units zero
        norms = {x: vector[x].double().norm() for x in chosen}
        zero = [x for x in chosen if float(norms[x]) == 0.0]
        if zero:
            raise ConfigError(f"cannot score along a zero direction at layer(s) {zero}")
        units = {x: (vector[x].double() / norms[x]).to(model.device, model.dtype) for x in chosen}
        return cls(units, detector)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.units)

    def project(self, layer: int, hidden: torch.Tensor, metric: str = "projection") -> torch.Tensor:
        """[batch, q, d] -> [batch, q] projections (or cosines), in the hidden's dtype."""
        projection = hidden @ self.units[layer]
        if metric == "cosine":
            projection = projection / hidden.norm(dim=-1).clamp_min(1e-12)
        return projection

    def standardise(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        """A detector's threshold scale; a vector's projections are kept as they are."""
        return values if self.detector is None else self.detector.standardise(layer, values)

    def per_token(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """This layer's reading of every token, [batch, q] float64 on the CPU."""
        return self.standardise(layer, self.project(layer, hidden).double().cpu())

    def affine(self, layer: int) -> tuple[float, float]:
        """(weight, bias) with ``weight * (h . v̂) + bias`` = this layer's share of the mean
        over layers of `per_token`: the form a fixed-shape table stores."""
        share = 1.0 / len(self.units)
        if self.detector is None:
            return share, 0.0
        scale = self.detector.scales[layer]
        return share / scale, -share * self.detector.offsets[layer] / scale


class LayerMeans:
    """Per-token scores of several readouts over one forward call: the mean over each
    readout's layers of `Readout.per_token`, summed as the hooks of its layers fire.

    >>> means = LayerMeans({"honesty": readout})
    >>> with hooked(model.hf, model.blocks, means.block_fns()): model.hf(ids)
    >>> means.scores()["honesty"]   # [batch, q]
    """

    def __init__(self, readouts: Mapping[str, Readout]) -> None:
        self.readouts = dict(readouts)
        self._sums: dict[str, torch.Tensor] = {}

    def block_fns(self) -> dict[int, list[BlockFn]]:
        fns: dict[int, list[BlockFn]] = {}
        for key, readout in self.readouts.items():
            for layer in readout.layers:
                fns.setdefault(layer, []).append(self._reader(key, readout))
        return fns

    def _reader(self, key: str, readout: Readout) -> BlockFn:
        def read(layer: int, hidden: torch.Tensor, _ctx: ForwardContext) -> None:
            values = readout.per_token(layer, hidden)  # [batch, q]
            previous = self._sums.get(key)
            self._sums[key] = values if previous is None else previous + values

        return read

    def scores(self) -> dict[str, torch.Tensor]:
        """Key -> [batch, q] mean over the readout's layers; starts the next call afresh."""
        sums, self._sums = self._sums, {}
        return {k: v / len(self.readouts[k].units) for k, v in sums.items()}


def _check_metric(metric: str, source: SteeringVector | Detector) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; use 'projection' or 'cosine'")
    if isinstance(source, Detector) and metric != "projection":
        raise ConfigError("a detector's scores are projections; leave metric unset")


@torch.no_grad()
def score_tokens(
    model: Model,
    texts: str | Sequence[str],
    vector: SteeringVector | Detector,
    *,
    layers: int | str | Sequence[int] | None = None,
    metric: str = "projection",
    chat: bool = False,
    batch_size: int = 16,
) -> list[TokenScores]:
    """Score every token of `texts` along `vector` (chat=True renders each as a user turn);
    given a `Detector`, each token's score is on its threshold's scale.

    >>> [scores] = acteng.score_tokens(model, "I am so happy today", vector, layers=[8])
    >>> list(zip(scores.tokens, scores.aggregate))
    """
    _check_metric(metric, vector)
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items or any(not t for t in items):
        raise ConfigError("score_tokens needs non-empty texts")
    chosen = parse_layers(model, layers if layers is not None else list(vector.layers))
    readout = Readout.of(model, vector, chosen)
    rendered = [model.render_prompt(t) if chat else t for t in items]
    encoded = [model.tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in rendered]
    for i, ids in enumerate(encoded):
        model.check_length(len(ids), f"text {i}")
    pad = int(model.tokenizer.pad_token_id)
    results: list[TokenScores | None] = [None] * len(items)
    for start in range(0, len(items), batch_size):
        rows = list(range(start, min(start + batch_size, len(items))))
        ids, mask = right_padded([encoded[i] for i in rows], pad)
        scores: dict[int, torch.Tensor] = {}

        def read(
            layer: int,
            hidden: torch.Tensor,
            _ctx: ForwardContext,
            scores: dict[int, torch.Tensor] = scores,
        ) -> None:
            values = readout.project(layer, hidden, metric).double().cpu()
            if metric == "projection":  # a detector's projections on its threshold's scale
                values = readout.standardise(layer, values)
            scores[layer] = values.float()

        run_until(
            model.hf,
            model.blocks,
            max(chosen),
            {x: [read] for x in chosen},
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
        )
        for r, i in enumerate(rows):
            n = len(encoded[i])
            results[i] = TokenScores(
                token_ids=list(encoded[i]),
                tokens=[model.tokenizer.decode([t]) for t in encoded[i]],
                per_layer={x: scores[x][r, :n].tolist() for x in chosen},
                metric=metric,
            )
    return [r for r in results if r is not None]


@dataclass
class Monitor:
    """Scores recorded by `monitor`: per batch row, per layer, one value per real token."""

    layers: list[int]
    metric: str
    rows: list[dict[int, list[float]]] = field(default_factory=list)

    def scores(self, row: int = 0) -> dict[int, list[float]]:
        return self.rows[row]

    def aggregate(self, row: int = 0) -> list[float]:
        """Mean over layers, one value per token of `row`."""
        return _mean_over_layers(self.rows[row])


@contextmanager
def monitor(
    model: Model,
    vector: SteeringVector | Detector,
    *,
    layers: int | str | Sequence[int] | None = None,
    metric: str = "projection",
) -> Iterator[Monitor]:
    """Record per-token scores of every forward call inside the block (prompt + generated).

    Scores of successive calls are appended per row, so one block covers one batch (one
    ``generate`` call); padding tokens are skipped. Given a `Detector`, the scores are its
    standardised per-layer projections, ``(h . v̂ - offset) / scale``, so the aggregate of
    a span is on the scale of the detector's threshold.

    >>> with acteng.monitor(model, honesty, layers=[12]) as mon:
    ...     model.hf.generate(**inputs, max_new_tokens=32)
    >>> mon.aggregate(0)   # one score per prompt and generated token of row 0

    The last generated token has no score: ``generate`` never feeds it back to the model.
    """
    _check_metric(metric, vector)
    detector = vector if isinstance(vector, Detector) else None
    chosen = parse_layers(model, layers if layers is not None else list(vector.layers))
    readout = Readout.of(model, vector, chosen)
    record = Monitor(layers=chosen, metric="detector" if detector is not None else metric)

    def read(layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> None:
        index = ctx.token_index
        if index is None or index.shape != hidden.shape[:2]:
            raise ConfigError(
                "monitoring needs the forward pass to go through model.hf (or "
                "model.hf.generate), not one of its submodules"
            )
        if not record.rows:
            record.rows = [{x: [] for x in chosen} for _ in range(index.shape[0])]
        elif len(record.rows) != index.shape[0]:
            raise ConfigError(
                f"the batch changed from {len(record.rows)} to {index.shape[0]} rows inside one "
                "monitor block; use one `with monitor(...)` per batch"
            )
        values = readout.standardise(layer, readout.project(layer, hidden, metric).float().cpu())
        real = (index >= 0).cpu()
        for row in range(values.shape[0]):
            record.rows[row][layer].extend(values[row][real[row]].tolist())

    fns: dict[int, list[BlockFn]] = {x: [read] for x in chosen}
    with hooked(model.hf, model.blocks, fns, track_positions=True):
        yield record
