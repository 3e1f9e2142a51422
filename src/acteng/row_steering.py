"""Per-row steering for batched serving: a fixed table of steering terms, one slot per row.

`steer` applies one set of specs to the whole batch. A server batches requests that each
carry their own specs, so it needs steering that differs per row. `SteeringTable` holds,
for every layer, `terms` steering terms per slot in fixed buffers (written in place, so a
compiled decoding step or another engine can use them without retracing); each batch row
names its slot, and slot 0 is all zeros (no steering). One block function per layer
applies, for each row, the terms of its slot:

    h' = h + g * (delta + (a - b * (h . u)) * u)

where ``g`` is 1 on the row's steered positions and 0 elsewhere, and per mode
``add``: delta = c v, a = b = 0 (so exactly ``h + c v``, what `steer` computes);
``ablate``: a = 0, b = c; ``clamp``: a = c |v|, b = 1; u is the unit direction.
Terms apply in the order given, like specs on a shared layer in `steer`.

>>> table = SteeringTable(model, slots=8)
>>> table.set(1, [SteeringSpec(vector, 4.0)], prompt_len=12)
>>> with table.applied(model, rows=torch.tensor([1, 0])):  # row 0 steered, row 1 not
...     model.hf(**inputs)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from acteng.errors import ConfigError
from acteng.hooks import BlockFn, ForwardContext, hooked
from acteng.models import Model
from acteng.positions import parse_positions
from acteng.steering import SteeringSpec

__all__ = ["SteeringTable"]


class SteeringTable:
    """Steering terms per (layer, term, slot) in fixed buffers; see the module docstring."""

    def __init__(self, model: Model, slots: int, *, terms: int = 8) -> None:
        if slots < 1 or terms < 1:
            raise ConfigError(
                f"a steering table needs slots >= 1 and terms >= 1, got {slots}, {terms}"
            )
        self.model = model
        self.slots, self.terms = slots, terms
        n, d = model.num_layers, model.hidden_size
        size = slots + 1  # slot 0: no steering
        device, dtype = model.device, model.dtype
        # [layer, term, slot, d] and [layer, term, slot]
        self.delta = torch.zeros(n, terms, size, d, device=device, dtype=dtype)
        self.unit = torch.zeros(n, terms, size, d, device=device, dtype=dtype)
        self.a = torch.zeros(n, terms, size, device=device, dtype=dtype)
        self.b = torch.zeros(n, terms, size, device=device, dtype=dtype)
        self.lo = torch.zeros(n, terms, size, dtype=torch.long, device=model.device)
        self.hi = torch.zeros(n, terms, size, dtype=torch.long, device=model.device)
        # Python-side bookkeeping, so layers and terms nobody uses cost nothing.
        self._used: dict[int, dict[int, int]] = {}  # slot -> {layer: number of terms}
        self._projecting: dict[int, set[int]] = {}  # slot -> layers with ablate/clamp terms

    def check(self, specs: Sequence[SteeringSpec]) -> None:
        """Raise if `specs` do not fit one slot (too many terms on a layer, wrong model)."""
        count: dict[int, int] = {}
        for spec in specs:
            spec.vector.check_compatible(self.model)
            for layer in spec.active_layers:
                count[layer] = count.get(layer, 0) + 1
        crowded = sorted(layer for layer, k in count.items() if k > self.terms)
        if crowded:
            raise ConfigError(
                f"more than {self.terms} steering terms on layer(s) {crowded}; combine vectors "
                f"or spread them over layers (at most {self.terms} per layer)"
            )

    def set(self, slot: int, specs: Sequence[SteeringSpec], *, prompt_len: int) -> None:
        """Write `specs` into `slot` (replacing what it held) for a row with `prompt_len`."""
        self._check_slot(slot)
        self.check(specs)
        self.clear(slot)
        used: dict[int, int] = {}
        projecting: set[int] = set()
        for spec in specs:
            lo, hi = parse_positions(spec.positions).bounds(prompt_len)
            c = spec.coefficient
            for layer in spec.active_layers:
                k = used.get(layer, 0)
                used[layer] = k + 1
                direction = spec.vector[layer].to(self.model.device, self.model.dtype)
                norm = direction.norm()
                if spec.mode == "add":
                    self.delta[layer, k, slot] = c * direction
                    if float(norm) > 0:
                        self.unit[layer, k, slot] = direction / norm
                elif spec.mode in ("ablate", "clamp"):
                    projecting.add(layer)
                    self.unit[layer, k, slot] = direction / norm
                    self.a[layer, k, slot] = 0.0 if spec.mode == "ablate" else c * float(norm)
                    self.b[layer, k, slot] = c if spec.mode == "ablate" else 1.0
                else:
                    raise ConfigError(
                        f"mode {spec.mode!r} cannot be served per row; use add, ablate or clamp"
                    )
                self.lo[layer, k, slot] = lo
                self.hi[layer, k, slot] = hi
        self._used[slot] = used
        self._projecting[slot] = projecting

    def clear(self, slot: int) -> None:
        """Remove every term of `slot` (its rows go unsteered)."""
        self._check_slot(slot)
        for layer in self._used.pop(slot, {}):
            for buf in (self.delta, self.unit, self.a, self.b, self.lo, self.hi):
                buf[layer, :, slot] = 0
        self._projecting.pop(slot, None)

    def is_empty(self, slot: int) -> bool:
        return not self._used.get(slot)

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.slots:
            raise ConfigError(f"slot {slot} is out of range 1..{self.slots} (slot 0 is unsteered)")

    def block_fns(self, rows: torch.Tensor) -> dict[int, list[BlockFn]]:
        """Block functions steering batch row i with slot ``rows[i]`` (0: unsteered)."""
        slot_ids = [int(s) for s in rows.tolist()]
        layers: dict[int, int] = {}  # layer -> number of terms any row uses there
        projecting: set[int] = set()
        for slot in set(slot_ids):
            for layer, k in self._used.get(slot, {}).items():
                layers[layer] = max(layers.get(layer, 0), k)
            projecting |= self._projecting.get(slot, set())
        index = rows.to(self.model.device)

        def make(layer: int, terms: int, project: bool) -> BlockFn:
            def apply(_layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
                # hidden: [batch, q, d]; token_index: [batch, q]
                token = ctx.token_index
                if token is None or token.shape != hidden.shape[:2]:
                    raise ConfigError("per-row steering needs the forward pass through model.hf")
                for k in range(terms):
                    lo = self.lo[layer, k, index].unsqueeze(1)  # [batch, 1]
                    hi = self.hi[layer, k, index].unsqueeze(1)
                    gate = ((token >= lo) & (token < hi)).unsqueeze(-1).to(hidden.dtype)
                    change = self.delta[layer, k, index].unsqueeze(1)  # [batch, 1, d]
                    if project:
                        unit = self.unit[layer, k, index].unsqueeze(1)  # [batch, 1, d]
                        along = (hidden * unit).sum(-1, keepdim=True)  # [batch, q, 1]
                        a = self.a[layer, k, index].view(-1, 1, 1)
                        b = self.b[layer, k, index].view(-1, 1, 1)
                        change = change + (a - b * along) * unit
                    hidden = hidden + gate * change
                return hidden

            return apply

        return {layer: [make(layer, terms, layer in projecting)] for layer, terms in layers.items()}

    @contextmanager
    def applied(self, model: Model, rows: torch.Tensor) -> Iterator[None]:
        """Steer the forward calls inside the block, batch row i by slot ``rows[i]``."""
        fns = self.block_fns(rows)
        if not fns:
            yield
            return
        with hooked(model.hf, model.blocks, fns, track_positions=True):
            yield
