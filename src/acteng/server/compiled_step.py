"""The server engine's decoding step as one compiled graph (its GPU fast path).

On a GPU, the eager engine spends a decoding step mostly in Python: the per-row attention
loop of `acteng.server.slots`, hooks attached and removed around each call, one kernel
launch per operation. `CompiledDecoder` runs the same step (every slot, one token each)
through ``torch.compile`` instead, with everything a graph needs fixed for the engine's
life:

- inputs (token ids, each slot's cache length, which is also its new token's position)
  live in device buffers written in place before each step;
- attention is one masked SDPA call over every slot's cache row (`SlotBatch.graph_safe`);
- steering reads the engine's `SteeringTable` (batch row i = slot i + 1) through one hook
  per block that stays attached, as in `acteng.steering.compiled`;
- monitoring too: a `MonitorTable` holds, per (layer, column, slot), a unit direction and
  the affine map that turns its projection into that layer's share of the monitor's score;
  the hook of every block adds its share, and the step returns the sums with the logits.

Plain Python values (`StepShape` for steering, `MonitorTable.on` for reading) select among
a few graphs, each compiled once; requests arriving and leaving, other vectors,
coefficients and monitors only rewrite buffers and never recompile. Prefill (one request,
many tokens) stays eager; the fixed hooks do nothing then.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from acteng.errors import ConfigError
from acteng.hooks import BlockFn, ForwardContext, HookHandle, attach
from acteng.models import Model
from acteng.server.requests import Monitored
from acteng.server.resolve import table_entries
from acteng.server.slots import InnerAttention, SlotBatch, SlotCache, slot_attention_enabled
from acteng.steering.compiled import allow_graphs
from acteng.steering.table import SteeringTable, StepShape

__all__ = ["CompiledDecoder", "MonitorTable"]


class MonitorTable:
    """Monitor directions per (layer, column, slot) in fixed float32 buffers.

    The score of the monitor in column k of slot s is ``sum over layers of
    weight * (h . unit) + bias``, with each layer's (weight, bias) from `Readout.affine`:
    the mean over the monitor's layers of what the eager readout computes, zero elsewhere.
    """

    def __init__(self, model: Model, slots: int, width: int) -> None:
        n, d, size = model.num_layers, model.hidden_size, slots + 1
        device = model.device
        self.width = width
        self.unit = torch.zeros(n, width, size, d, device=device)
        self.weight = torch.zeros(n, width, size, device=device)
        self.bias = torch.zeros(n, width, size, device=device)
        self.columns: dict[int, list[str]] = {}  # slot -> monitor keys in column order
        # Read while tracing: False is the graph that reads nothing.
        self.on = False
        self._parts: list[torch.Tensor] = []

    def set(self, slot: int, monitored: Sequence[Monitored]) -> None:
        """Give `slot` the monitors `monitored` (replacing what it had)."""
        entries = list(table_entries(monitored, self.width, "the compiled engine"))
        self.clear(slot)
        for k, layer, unit, weight, bias in entries:
            self.unit[layer, k, slot] = unit.to(self.unit.device)
            self.weight[layer, k, slot] = weight
            self.bias[layer, k, slot] = bias
        if monitored:
            self.columns[slot] = [m.key for m in monitored]

    def clear(self, slot: int) -> None:
        if self.columns.pop(slot, None) is not None:
            self.unit[:, :, slot] = 0
            self.weight[:, :, slot] = 0
            self.bias[:, :, slot] = 0

    def buffers(self) -> tuple[torch.Tensor, ...]:
        return (self.unit, self.weight, self.bias)

    def block_fn(self, layer: int) -> BlockFn:
        """Add this layer's share of every column's score to the step's running parts."""

        def read(_layer: int, hidden: torch.Tensor, _ctx: ForwardContext) -> None:
            if not self.on:
                return
            rows = slice(1, hidden.shape[0] + 1)
            unit = self.unit[layer, :, rows]  # [width, batch, d]
            along = torch.einsum("bqd,kbd->bqk", hidden.float(), unit)  # [batch, q, width]
            weight = self.weight[layer, :, rows].T.unsqueeze(1)  # [batch, 1, width]
            bias = self.bias[layer, :, rows].T.unsqueeze(1)
            self._parts.append(along * weight + bias)

        return read

    def begin(self) -> None:
        self._parts = []

    def total(self) -> torch.Tensor | None:
        """The scores summed over layers, [batch, q, width], or None when not reading."""
        if not self._parts:
            return None
        return torch.stack(self._parts).sum(0)


class CompiledDecoder:
    """One compiled decoding step over every slot of a `SlotCache`; see the module doc.

    `backend` and `mode` go to ``torch.compile`` (tests on CPU use the "eager" backend;
    on CUDA "reduce-overhead" captures CUDA graphs).
    """

    def __init__(
        self,
        model: Model,
        table: SteeringTable,
        cache: SlotCache,
        *,
        monitors: int,
        cache_arg: str,
        inner: InnerAttention,
        backend: str = "inductor",
        mode: str | None = None,
    ) -> None:
        slots = table.slots
        if cache.slots != slots:
            raise ConfigError("the steering table and the cache need the same number of slots")
        self.model, self.table, self.cache = model, table, cache
        self.slots = slots
        self.cache_arg = cache_arg
        self.shape = StepShape()
        self.monitors = MonitorTable(model, slots, monitors)
        device = model.device
        self.ids = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.batch = SlotBatch(
            slots=torch.arange(slots, device=device),
            starts=torch.zeros(slots, dtype=torch.long, device=device),
            active=torch.ones(slots, dtype=torch.bool, device=device),
            graph_safe=True,
            inner=inner,
        )
        self.on_cuda = device.type == "cuda"
        if self.on_cuda:
            # CUDA graphs read these at fixed addresses; in-place writes are seen by replays.
            for buffer in (*table.buffers(), *self.monitors.buffers(), self.batch.starts):
                torch._dynamo.mark_static_address(buffer)
        self.handle = HookHandle()
        self.open()
        self._cache_marked = False
        options: dict[str, Any] = {
            "backend": backend,
            "mode": mode or ("reduce-overhead" if self.on_cuda else "default"),
            "fullgraph": True,
        }
        # Steering shapes (1 + 2 per term count) x monitors read or not. Recent torch keeps
        # dynamo's settings per thread, and the engine compiles in its own thread: the
        # limit must travel with the compiled function where torch.compile takes it.
        limit = 2 * (1 + 2 * table.terms)
        if "recompile_limit" in inspect.signature(torch.compile).parameters:
            options["recompile_limit"] = limit
        else:
            allow_graphs(limit)
        self._compiled = torch.compile(self._forward, **options)

    def open(self) -> None:
        """Attach the fixed hooks (steering, then monitor reads) to every block."""
        if self.handle.active:
            return
        steer = self.table.fixed_block_fns(self.shape)
        fns = {
            layer: [*steer.get(layer, []), self.monitors.block_fn(layer)]
            for layer in range(self.model.num_layers)
        }
        self.handle = attach(self.model.hf, self.model.blocks, fns, graph_safe=True)

    def close(self) -> None:
        """Take the hooks off the model (the engine stopped; `open` puts them back)."""
        self.handle.remove()

    def _forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.monitors.begin()
        output = self.model.hf(
            input_ids=ids,
            position_ids=self.batch.starts[:, None],  # a slot's new token sits at its length
            use_cache=True,
            logits_to_keep=1,
            acteng_slots=self.batch,
            **{self.cache_arg: self.cache},
        )
        return output.logits[:, -1].float(), self.monitors.total()

    @torch.no_grad()
    def step(
        self, inputs: Sequence[int], lengths: Sequence[int], live: Sequence[bool]
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Decode one token for every slot.

        inputs, lengths: per slot, the token to feed and the tokens already cached (0
        and anything for empty slots); live: which slots hold a request. Returns the
        logits [slots, vocab] and, per slot, its monitors' scores (key -> [1]).
        """
        if not self._cache_marked and self.on_cuda:
            for buffer in self.cache.buffers():  # allocated by the first (eager) prefill
                torch._dynamo.mark_static_address(buffer)
        self._cache_marked = True
        device = self.ids.device
        lengths_t = torch.tensor(list(lengths), dtype=torch.long)
        self.ids.copy_(torch.tensor(list(inputs), dtype=torch.long)[:, None].to(device))
        self.batch.starts.copy_(lengths_t.to(device))
        live_slots = [i + 1 for i, alive in enumerate(live) if alive]
        self.shape.terms = self.table.terms_in_use(live_slots)
        self.shape.full = self.table.needs_full(live_slots)
        self.monitors.on = any(slot in self.monitors.columns for slot in live_slots)
        self.cache.batch = self.batch
        try:
            with slot_attention_enabled(self.model):
                logits, scores = self._compiled(self.ids)
        finally:
            self.cache.batch = None
            self.shape.terms, self.shape.full = 0, False
            self.monitors.on = False
        # CUDA graph outputs are overwritten by the next replay: keep copies.
        logits = logits.clone()
        per_row: list[dict[str, torch.Tensor]] = [{} for _ in range(self.slots)]
        if scores is not None:
            values = scores.double().cpu()  # [slots, 1, width]
            for slot, keys in self.monitors.columns.items():
                for k, key in enumerate(keys):
                    per_row[slot - 1][key] = values[slot - 1, :, k]
        return logits, per_row
