"""Per-token monitor scores inside one vLLM worker, read by the same hooks as steering.

A request asks for monitors in ``SamplingParams.extra_args``::

    extra_args={"acteng_monitor": [{"vector": "honesty", "layers": [12]}, ...]}

(names resolved through the vector library, like ``steering``; ``acteng serve --engine
vllm`` sends the ``monitor`` field and the guard's detector this way). The worker gives
the request a slot, as for steering, and writes its monitors into fixed buffers: per
(layer, slot, column) a unit direction scaled by the weight of `Readout.affine` (the
readout the transformers engine and the library use), so each layer adds its share of
the mean over the monitor's layers, standardised for a detector. The hook of every decoder
layer, after steering, writes

    parts[layer, token, k] = stream . (weight * unit)     (gathered by token slot)

for every token of the step: the same operations whatever the table holds, so the code
traced into vLLM's compiled graph never changes. After the forward call, `after_step`
sums the parts over layers and files each monitored request's scores by token position;
the front end collects them with ``collective_rpc("acteng_monitor_scores", ...)``
(`take`). A token's score is read where the model reads that token, as in
`acteng.monitoring`: a generated token is scored in the step that feeds it back.

Positions a request skips because vLLM found them in its prefix cache are not scored:
``acteng serve --engine vllm`` gives a monitored request its own cache salt.

A guard that counter-steers mid-generation runs in the worker too (``acteng_guard``,
`GuardWatch`): the guard's own `GuardState` reads the detector's column after each step,
and on "steer" the request moves to a slot with the counter-steering before its next
step, which is where the transformers engine starts it. (The front end runs the same
`GuardState` on the same scores for the verdict it reports.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from acteng.errors import ActengError, RequestError
from acteng.guard_policy import Guard, GuardState
from acteng.server.requests import Limits, parse_steering
from acteng.server.resolve import Monitored, table_entries
from acteng.vllm_engine.requests import ModelShape, resolver_for

__all__ = [
    "GUARD_KEY",
    "MONITOR_KEY",
    "GuardWatch",
    "RunnerMonitors",
    "Span",
    "monitor_items",
    "parse_guard_watch",
    "parse_monitors",
]

log = logging.getLogger(__name__)

MONITOR_KEY = "acteng_monitor"
GUARD_KEY = "acteng_guard"
_NO_LIMITS = Limits(max_steering=1024)  # the front end enforced the server's limits


def monitor_items(extra_args: Any) -> list[dict[str, Any]]:
    """The ``acteng_monitor`` items of a request's extra_args ([] for none), checked."""
    value = extra_args.get(MONITOR_KEY) if isinstance(extra_args, dict) else None
    if value in (None, []):
        return []
    if not isinstance(value, list) or not all(
        isinstance(i, dict) and isinstance(i.get("vector"), str) for i in value
    ):
        raise RequestError(
            f'{MONITOR_KEY} must be a list like [{{"vector": "name", "layers": [8]}}], got '
            f"{value!r}",
            param=MONITOR_KEY,
        )
    return value


def parse_monitors(
    items: Sequence[dict[str, Any]], shape: ModelShape, home: str | None = None
) -> list[Monitored]:
    """The monitors `items` name, resolved as the HTTP server resolves its ``monitor``."""
    resolver = resolver_for(shape, home)
    found = []
    for i, item in enumerate(items):
        layers = item.get("layers")
        chosen = None if layers is None else tuple(int(x) for x in layers)
        found.append(resolver.monitored(item["vector"], chosen, f"{MONITOR_KEY}[{i}]"))
    return found


@dataclass
class GuardWatch:
    """A guard that counter-steers when the running score crosses, for one request."""

    state: GuardState
    column: int  # the detector's monitor column
    prompt_len: int
    steered: dict[str, Any]  # the request's extra_args with the counter-steering added


def parse_guard_watch(
    extra_args: Any, shape: ModelShape, prompt_len: int, home: str | None = None
) -> GuardWatch | None:
    """The ``acteng_guard`` of a request's extra_args (None: none), as ``acteng serve
    --engine vllm`` sends it: detector, check, thresholds, counter (steering items),
    column and the prompt's score (null when the prompt is not checked)."""
    value = extra_args.get(GUARD_KEY) if isinstance(extra_args, dict) else None
    if value is None:
        return None
    try:
        resolver = resolver_for(shape, home)
        counter = parse_steering(value["counter"], "guard.counter", resolver, _NO_LIMITS)
        guard = Guard(
            resolver.detector(value["detector"], "guard.detector"),
            "steer",
            value["check"],
            tuple(counter),
            threshold=value.get("threshold"),
            generation_threshold=value.get("generation_threshold"),
        )
        column = int(value["column"])
    except (KeyError, TypeError, ValueError, ActengError) as exc:
        raise RequestError(f"{GUARD_KEY} is not usable: {exc}", param=GUARD_KEY) from exc
    state = GuardState(guard)
    if value.get("prompt_score") is not None:
        state.on_prompt(float(value["prompt_score"]))
    steering = extra_args.get("steering") or []
    steered = {**extra_args, "steering": [*steering, *value["counter"]]}
    return GuardWatch(state, column, prompt_len, steered)


@dataclass
class Span:
    """Where one monitored request's tokens are in this step's flat batch."""

    req_id: str
    start: int  # first token in the batch
    count: int
    position: int  # the first token's position in the request
    columns: int
    slot: int  # its monitors' slot


class RunnerMonitors:
    """The monitor side of one model runner: directions, per-layer parts and filed scores.

    The score of the monitor in column k of slot s is ``sum over layers of weight *
    (h . unit) + bias`` (`Readout.affine`, as in the transformers engine's `MonitorTable`).
    Here the weight is folded into the direction and the biases are summed once, outside
    the graph, so each layer's hook is one gather and one batched dot product: the hooks
    run on every step whether or not a request is monitored, so they must stay cheap.
    """

    def __init__(self, shape: ModelShape, *, slots: int, width: int, max_tokens: int) -> None:
        n, d, size = shape.num_layers, shape.hidden_size, slots + 1
        self.width = width
        # [layer, slot, column, d]: each monitor's unit direction times its layer weight
        self.scaled = torch.zeros(n, size, width, d, device=shape.device)
        self.bias = np.zeros((size, width))  # [slot, column]: the biases summed over layers
        # [layer, token, column]: each layer's share of each token's scores, this step
        self.parts = torch.zeros(n, max_tokens, width, device=shape.device)
        self._step: list[Span] = []
        self._tokens = 0
        # request id -> (first position, [count, columns] scores) chunks not yet taken
        self.filed: dict[str, list[tuple[int, np.ndarray]]] = {}

    def assign(self, slot: int, monitored: Sequence[Monitored]) -> None:
        """Give `slot` the monitors `monitored` (replacing what it had)."""
        entries = list(table_entries(monitored, self.width, "this vLLM engine"))
        self.clear(slot)
        for k, layer, unit, weight, bias in entries:
            self.scaled[layer, slot, k] = unit.to(self.scaled.device) * weight
            self.bias[slot, k] += bias

    def clear(self, slot: int) -> None:
        self.scaled[:, slot] = 0
        self.bias[slot] = 0

    # --- in the graph --------------------------------------------------------------------
    def read(self, layer: int, stream: torch.Tensor, slot: torch.Tensor) -> None:
        """stream: [tokens, d] residual stream after block `layer`; slot: [tokens]."""
        scaled = self.scaled[layer][slot]  # [tokens, width, d]
        along = torch.bmm(scaled, stream.float().unsqueeze(-1))  # [tokens, width, 1]
        self.parts[layer, : stream.shape[0]] = along.squeeze(-1)

    # --- per step, outside the graph -----------------------------------------------------
    def plan(self, spans: list[Span], tokens: int) -> None:
        """The monitored requests of the coming step (`tokens` in all)."""
        self._step, self._tokens = spans, tokens

    def after_step(self) -> list[tuple[Span, np.ndarray]]:
        """File the scores of the step just run under each monitored request; returns
        them too, (span, [count, columns]) per request."""
        spans, self._step = self._step, []
        if not spans:
            return []
        totals = self.parts[:, : self._tokens].sum(0).double().cpu().numpy()  # [tokens, width]
        out = []
        for span in spans:
            chunk = totals[span.start : span.start + span.count, : span.columns]
            chunk = chunk + self.bias[span.slot, : span.columns]
            self.filed.setdefault(span.req_id, []).append((span.position, chunk))
            out.append((span, chunk))
        return out

    def take(self, req_ids: Sequence[str], drop: Sequence[str] = ()) -> dict[str, Any]:
        """The scores filed for `req_ids` since the last call, as plain lists
        ``[[first position, [[score per column] per token]], ...]``; forget `drop`."""
        out = {}
        for req_id in req_ids:
            chunks = self.filed.pop(req_id, [])
            out[req_id] = [[position, chunk.tolist()] for position, chunk in chunks]
        for req_id in drop:
            self.filed.pop(req_id, None)
        return out

    def forget_unknown(self, live: set[str], keep: int = 4096) -> None:
        """Bound what is filed for requests nobody collects (the front end went away)."""
        if len(self.filed) > keep:
            for req_id in [r for r in self.filed if r not in live][: len(self.filed) - keep]:
                del self.filed[req_id]
