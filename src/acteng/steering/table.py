"""Per-row steering for batched serving: a fixed table of steering terms, one slot per row.

`steer` applies one set of specs to the whole batch. A server batches requests that each
carry their own specs, so it needs steering that differs per row. `SteeringTable` holds,
for every layer, `terms` steering terms per slot in fixed buffers (written in place, so a
compiled decoding step or another engine can use them without retracing); each batch row
names its slot, and slot 0 is all zeros (no steering). One block function per layer
applies, for each row, the terms of its slot:

    h' = h + g * (delta + (a - b * (h . u)) * u)

where ``g`` is 1 on the row's steered positions and 0 elsewhere and u is the unit
direction. Each mode gives its delta, a and b (its `acteng.steering.modes.TableTerm`):
``add``: delta = c v, a = b = 0 (so exactly ``h + c v``, what `steer` computes);
``ablate``: a = 0, b = c; ``clamp``: a = c |v|, b = 1; a mode added with `register_mode`
brings its own. `SteeringTable.add_terms` is the one implementation of the formula: the
eager and fixed (compiled) block functions here, the server's compiled step and the vLLM
worker all call it. Terms apply in the order given, like specs on a shared layer in `steer`.

>>> table = SteeringTable(model, slots=8)
>>> table.set(1, [SteeringSpec(vector, 4.0)], prompt_len=12)
>>> with table.applied(model, rows=torch.tensor([1, 0])):  # row 0 steered, row 1 not
...     model.hf(**inputs)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from acteng.errors import ConfigError
from acteng.hooks import BlockFn, ForwardContext, hooked
from acteng.models import Model
from acteng.positions import parse_positions
from acteng.steering.modes import mode_named
from acteng.steering.spec import SteeringSpec
from acteng.vectors import SteeringVector

__all__ = ["SteeringTable", "StepShape"]


@dataclass
class StepShape:
    """What a compiled step computes, as plain Python values it is traced with.

    terms: steering terms applied per layer (0: none, the plain model's graph).
    full: the whole formula (projection and per-token gate), needed when a term projects
        (ablate, clamp: `TableTerm.projects`) or is limited to some positions; otherwise
        only ``h + delta``.
    Each combination is one graph; changing vectors, coefficients or rows changes none.
    """

    terms: int = 0
    full: bool = False


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
        self._windowed: set[int] = set()  # slots with a term limited to some positions
        # Device copies of the vectors in use (dropped with the vector).
        self._prepared: weakref.WeakKeyDictionary[
            SteeringVector, dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
        ] = weakref.WeakKeyDictionary()

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
        self.set_many([(slot, specs, prompt_len)])

    def set_many(self, items: Sequence[tuple[int, Sequence[SteeringSpec], int]]) -> None:
        """`set` for several ``(slot, specs, prompt_len)`` at once.

        Every item is checked and encoded (each spec's mode gives its `TableTerm`) before
        any buffer changes. A batch costs the same dozen
        device writes whatever its size: every index and position bound travels in one
        host-to-device copy, the old terms are cleared with one indexed write per buffer
        and the new ones written with another (on a GPU, per-row writes and small copies
        would add up to milliseconds of launches per call).
        """
        for slot, specs, _ in items:
            self._check_slot(slot)
            self.check(specs)
            for spec in specs:
                mode_named(spec.mode)  # refuses a mode without a table term, before any write
        where: list[tuple[int, int, int]] = []  # (layer, term, slot) per written term
        bounds: list[tuple[int, int]] = []  # (lo, hi) per written term
        deltas, units, coefs_a, coefs_b = [], [], [], []
        books: list[tuple[int, dict[int, int], set[int], bool]] = []  # kept once all encode
        for slot, specs, prompt_len in items:
            used: dict[int, int] = {}
            projecting: set[int] = set()
            windowed = False
            for spec in specs:
                positions = parse_positions(spec.positions)
                windowed |= positions.kind != "all"
                layers = tuple(spec.active_layers)
                directions, unit, norms = self._on_device(spec.vector, layers)
                term = mode_named(spec.mode).term(directions, norms, spec.coefficient)
                if term.projects:
                    projecting.update(layers)
                units.append(unit)
                deltas.append(_filled(term.delta, directions, spec.mode, "delta"))
                coefs_a.append(_filled(term.a, norms, spec.mode, "a"))
                coefs_b.append(_filled(term.b, norms, spec.mode, "b"))
                bounds.extend([positions.bounds(prompt_len)] * len(layers))
                for layer in layers:
                    where.append((layer, used.get(layer, 0), slot))
                    used[layer] = used.get(layer, 0) + 1
            books.append((slot, used, projecting, windowed))
        cleared = self._forget([slot for slot, _, _ in items])  # (layer, slot) to zero
        for slot, used, projecting, windowed in books:
            self._used[slot] = used
            self._projecting[slot] = projecting
            if windowed:
                self._windowed.add(slot)
        # One copy of all the integers: columns (layer, slot) to clear, then per written
        # term (layer, term, slot, lo, hi).
        flat = [x for pair in cleared for x in pair] + [
            x for point, bound in zip(where, bounds, strict=True) for x in (*point, *bound)
        ]
        if not flat:
            return
        ints = torch.tensor(flat, dtype=torch.long, device=self.model.device)
        if cleared:
            pairs = ints[: 2 * len(cleared)].view(-1, 2)
            for buf in self.buffers():
                buf[pairs[:, 0], :, pairs[:, 1]] = 0
        if not where:
            return
        terms = ints[2 * len(cleared) :].view(-1, 5)
        at = (terms[:, 0], terms[:, 1], terms[:, 2])
        dtype = self.model.dtype
        self.delta[at] = torch.cat(deltas).to(dtype)
        self.unit[at] = torch.cat(units).to(dtype)
        self.a[at] = torch.cat(coefs_a).to(dtype)
        self.b[at] = torch.cat(coefs_b).to(dtype)
        self.lo[at] = terms[:, 3]
        self.hi[at] = terms[:, 4]

    def _forget(self, slots: Sequence[int]) -> list[tuple[int, int]]:
        """Drop the bookkeeping of `slots`; returns the (layer, slot) columns they used."""
        cleared = [(layer, slot) for slot in slots for layer in self._used.pop(slot, {})]
        for slot in slots:
            self._projecting.pop(slot, None)
            self._windowed.discard(slot)
        return cleared

    def _on_device(
        self, vector: SteeringVector, layers: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The vector's directions at `layers` on the model's device, unit directions, norms.

        Computed in float32 (float64 for float64 models) and cached per vector, so
        serving the same library vector again copies and computes nothing.
        """
        cached = self._prepared.setdefault(vector, {})
        if layers not in cached:
            dtype = torch.float64 if self.model.dtype == torch.float64 else torch.float32
            stacked = torch.stack([vector[layer] for layer in layers])
            directions = stacked.to(self.model.device, dtype)
            norms = directions.norm(dim=1)
            cached[layers] = (directions, directions / norms.clamp_min(1e-30).unsqueeze(1), norms)
        return cached[layers]

    def terms_in_use(self, slots: Sequence[int]) -> int:
        """The most terms any of `slots` puts on one layer (0 when none is steered)."""
        return max((max(self._used.get(s, {}).values(), default=0) for s in slots), default=0)

    def needs_full(self, slots: Sequence[int]) -> bool:
        """Whether any of `slots` has a projecting term or steers only some positions."""
        return any(self._projecting.get(s) or s in self._windowed for s in slots)

    def clear(self, slot: int) -> None:
        """Remove every term of `slot` (its rows go unsteered)."""
        self.set_many([(slot, [], 0)])

    def is_empty(self, slot: int) -> bool:
        return not self._used.get(slot)

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.slots:
            raise ConfigError(f"slot {slot} is out of range 1..{self.slots} (slot 0 is unsteered)")

    def add_terms(
        self,
        layer: int,
        terms: int,
        rows: torch.Tensor | slice,
        hidden: torch.Tensor,
        token: torch.Tensor | None,
        *,
        project: bool = True,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`hidden` after the first `terms` terms at `layer` of each row's slot.

        The one place the formula is computed, for every executor (eager and fixed block
        functions here, the compiled paths through those, and the vLLM worker).
        hidden: [rows, q, d], or [rows, d] for vLLM's flat batch of tokens; `rows` gives
        each row's slot (an index tensor [rows], or a slice of consecutive slots); `token`
        [rows, q] or [rows] the token positions the windows read (None: no gate, every
        token steered). ``project=False`` reads only delta: right when no row's term on
        this layer projects (`TableTerm.projects`). With `residual`, the projection reads
        the stream ``hidden + residual`` (vLLM's decoder layers return that pair) and the
        change is added to `hidden` alone. Tensor operations only, no branching on data,
        so the code traced into a compiled graph is the same whatever the buffers hold.
        """
        between = hidden.dim() - 2  # token axes between the row and d: 1 (q) or 0 (vLLM)
        stream = hidden if residual is None else hidden + residual
        for k in range(terms):
            change = _per_row(self.delta[layer, k][rows], between)  # [rows, (1,) d]
            if project:
                unit = _per_row(self.unit[layer, k][rows], between)  # [rows, (1,) d]
                a = _per_row(self.a[layer, k][rows].unsqueeze(-1), between)  # [rows, (1,) 1]
                b = _per_row(self.b[layer, k][rows].unsqueeze(-1), between)
                along = (stream * unit).sum(-1, keepdim=True)  # [rows, (q,) 1]
                change = change + (a - b * along) * unit
            if token is not None:
                lo = _per_row(self.lo[layer, k][rows], between)  # [rows, (1)]
                hi = _per_row(self.hi[layer, k][rows], between)
                gate = (token >= lo) & (token < hi)  # [rows, (q)]
                change = change * gate.unsqueeze(-1).to(hidden.dtype)
            hidden = hidden + change
            stream = hidden if residual is None else stream + change
        return hidden

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
                token = ctx.token_index  # [batch, q]; hidden: [batch, q, d]
                if token is None or token.shape != hidden.shape[:2]:
                    raise ConfigError("per-row steering needs the forward pass through model.hf")
                return self.add_terms(layer, terms, index, hidden, token, project=project)

            return apply

        return {layer: [make(layer, terms, layer in projecting)] for layer, terms in layers.items()}

    def fixed_block_fns(self, shape: StepShape) -> dict[int, list[BlockFn]]:
        """Block functions for a compiled step: every layer, the same code on every call.

        Batch row i reads slot i + 1 (a slice, not a gather), so write the slots in row
        order and clear those of unsteered rows. Rewriting the buffers in place changes
        the steering without changing the traced graph. `shape` is read in Python while
        tracing: each of its values is one graph, compiled once (see `StepShape`).
        The token index comes from the block's ``position_ids`` (attach with
        ``graph_safe=True``).
        """

        def make(layer: int) -> BlockFn:
            def apply(
                _layer: int, hidden: torch.Tensor, ctx: ForwardContext
            ) -> torch.Tensor | None:
                if shape.terms == 0:
                    return None  # nothing steered: the plain model's graph
                token = ctx.token_index  # [batch, q]
                if shape.full and token is None:
                    raise ConfigError(
                        "ablate, clamp and position windows on the compiled path need the "
                        "position_ids this architecture's blocks do not receive; use "
                        "compiled=False"
                    )
                rows = slice(1, hidden.shape[0] + 1)
                gate = token if shape.full else None  # plain additions steer every token
                return self.add_terms(layer, shape.terms, rows, hidden, gate, project=shape.full)

            return apply

        return {layer: [make(layer)] for layer in range(self.model.num_layers)}

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the steering reads (for marking static addresses in CUDA graphs)."""
        return (self.delta, self.unit, self.a, self.b, self.lo, self.hi)

    @contextmanager
    def applied(self, model: Model, rows: torch.Tensor) -> Iterator[None]:
        """Steer the forward calls inside the block, batch row i by slot ``rows[i]``."""
        fns = self.block_fns(rows)
        if not fns:
            yield
            return
        with hooked(model.hf, model.blocks, fns, track_positions=True, steering=True):
            yield


def _per_row(values: torch.Tensor, axes: int) -> torch.Tensor:
    """Per-row values [rows, ...] with `axes` size-1 axes after the row axis, so they
    broadcast over each row's tokens."""
    for _ in range(axes):
        values = values.unsqueeze(1)
    return values


def _filled(
    value: torch.Tensor | float | None, like: torch.Tensor, mode: str, name: str
) -> torch.Tensor:
    """A `TableTerm` field as a tensor shaped like `like` (None is zero)."""
    if value is None:
        return torch.zeros_like(like)
    if not isinstance(value, torch.Tensor):
        return torch.zeros_like(like) + value
    if value.shape != like.shape:
        raise ConfigError(
            f"mode {mode!r}'s table term gives {name} of shape {tuple(value.shape)}, expected "
            f"{tuple(like.shape)} (one row per steered layer); fix the term function "
            "passed to register_mode"
        )
    return value
