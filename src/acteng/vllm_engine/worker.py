"""Per-request steering inside one vLLM worker, safe for torch.compile and CUDA graphs.

vLLM runs one flat batch of tokens per step (prefill chunks and decode tokens of many
requests together). Steering is data, not code:

- `acteng.steering.table.SteeringTable` holds, per layer and term, the steering of every
  slot in fixed buffers (slot 0 is all zeros: unsteered requests and padding);
- ``token_slot`` [max_tokens] says which slot each token of the step uses.

Both are written in place once per step, outside the graph (`RunnerSteering.before_step`,
from the input batch's request order and ``query_start_loc``); the hook on each decoder
layer only gathers rows by ``token_slot`` and applies the table's per-slot formula

    h' = h + g * (delta + (a - b * (h . u)) * u)

through `SteeringTable.add_terms`, the same code as the transformers executors (see
`acteng.steering.table`), with no Python branching on data and no new buffers, so the
compiled graph (and a captured CUDA graph) reads the new values every step. The hooks are
registered by `acteng.hooks.attach_residual_pairs` before vLLM compiles the model: a hook
added after warm-up is never traced.

Layer contract: vLLM's decoder layers return ``(hidden_states, residual)`` whose sum is the
residual stream after the block (transformers' ``hidden_states[i + 1]``); the change is
added to ``hidden_states``, and projections (ablate, clamp) read the sum.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from acteng.hooks import HookHandle, attach_residual_pairs
from acteng.models import Model
from acteng.server.requests import Limits
from acteng.steering.table import SteeringTable
from acteng.vllm_engine.monitors import (
    GuardWatch,
    RunnerMonitors,
    Span,
    monitor_items,
    parse_guard_watch,
    parse_monitors,
)
from acteng.vllm_engine.requests import ModelShape, ParsedSteering, parse_extra_args

__all__ = ["DEFAULT_TERMS", "VERIFIED_ARCHITECTURES", "RunnerSteering", "decoder_layers"]

log = logging.getLogger(__name__)

# Steering terms per layer and request (several specs on one layer); more cost a gather each.
DEFAULT_TERMS = 2
# Families whose decoder layers were checked to return (hidden_states, residual) with the
# residual stream as their sum, and tested against the transformers engine.
VERIFIED_ARCHITECTURES = {"LlamaForCausalLM": "model.layers", "Gemma3ForCausalLM": "model.layers"}


def decoder_layers(model: nn.Module, architecture: str, num_layers: int) -> list[nn.Module]:
    """The decoder layers of a vLLM model, block 0 first."""
    path = VERIFIED_ARCHITECTURES.get(architecture, "model.layers")
    if architecture not in VERIFIED_ARCHITECTURES:
        log.warning(
            "acteng: steering %s assumes its decoder layers at %s return (hidden_states, "
            "residual) like Llama's; verified only for %s",
            architecture,
            path,
            ", ".join(VERIFIED_ARCHITECTURES),
        )
    found: Any = model
    for part in path.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, nn.ModuleList) or len(found) != num_layers:
        raise RuntimeError(
            f"acteng cannot steer {architecture}: expected {num_layers} decoder layers at "
            f"{path}, found {type(found).__name__}; disable the plugin with "
            "VLLM_PLUGINS='' or ACTENG_VLLM_STEERING=0"
        )
    return list(found)


class RunnerSteering:
    """The steering state of one model runner: table, per-token slots and layer hooks."""

    def __init__(
        self,
        shape: ModelShape,
        *,
        slots: int,
        max_tokens: int,
        terms: int = DEFAULT_TERMS,
        monitors: int = 0,
        home: str | None = None,
    ) -> None:
        self.shape = shape
        self.home = home
        self.terms = terms
        # The table reads only num_layers, hidden_size, device, dtype and name.
        self.table = SteeringTable(cast(Model, shape), slots, terms=terms)
        # Monitor columns per slot (0: the hooks read nothing, as before monitors existed).
        self.monitors = (
            RunnerMonitors(shape, slots=slots, width=monitors, max_tokens=max_tokens)
            if monitors
            else None
        )
        self.token_slot = torch.zeros(max_tokens, dtype=torch.long, device=shape.device)
        self._staging = np.zeros(max_tokens, dtype=np.int64)
        self._dirty = 0  # tokens of token_slot that may be non-zero
        self.slot_of: dict[str, int] = {}  # request id -> slot (0: unsteered)
        self._key_slot: dict[str, int] = {}  # steering and monitors key -> slot
        self._columns: dict[str, int] = {}  # request id -> its monitor columns
        self._watches: dict[str, GuardWatch] = {}  # request id -> its counter-steering guard
        self._users: dict[int, int] = {}  # slot -> requests using it
        self._free = list(range(slots, 0, -1))
        self.hooks = HookHandle()  # the decoder layer hooks, once installed

    # --- hooks (traced into the compiled graph) ------------------------------------------
    @property
    def handles(self) -> list[torch.utils.hooks.RemovableHandle]:
        """The torch hook handles, one per hooked layer."""
        return self.hooks.handles

    def install(self, layers: Sequence[nn.Module]) -> None:
        """Hook every layer; call before vLLM compiles or captures the model."""
        self.remove()
        self.hooks = attach_residual_pairs(layers, dict.fromkeys(range(len(layers)), self._steer))

    def remove(self) -> None:
        self.hooks.remove()

    def _steer(
        self, layer: int, hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        # hidden, residual: [tokens, d]; positions: [tokens]. Every term, no data-dependent
        # branch: the traced graph stays the same whatever the table holds.
        slot = self.token_slot[: hidden.shape[0]]  # [tokens]
        hidden = self.table.add_terms(layer, self.terms, slot, hidden, positions, residual=residual)
        if self.monitors is not None:  # a per-engine setting, fixed before tracing
            self.monitors.read(layer, hidden + residual, slot)
        return hidden

    # --- per step, outside the graph -----------------------------------------------------
    def before_step(
        self,
        req_ids: Sequence[str],
        query_start_loc: np.ndarray,
        requests: Mapping[str, Any],
        computed: np.ndarray | None = None,
    ) -> None:
        """Point each token of the coming step at its request's slot.

        `req_ids` are the batch's requests in order, `query_start_loc` [len + 1] where
        each one's tokens start in the flat batch, `requests` the runner's request states
        (for new requests' ``sampling_params`` and prompt; a request no longer there has
        finished and gives its slot back), `computed` [len] each one's tokens already in
        the cache (the position of its first token this step; needed for monitors).
        """
        for req_id in [r for r in self.slot_of if r not in requests]:
            self.release(req_id)
        slots = np.zeros(len(req_ids), dtype=np.int64)
        for i, req_id in enumerate(req_ids):
            slot = self.slot_of.get(req_id)
            if slot is None:
                slot = self._assign(req_id, requests[req_id])
            slots[i] = slot
        if self.monitors is not None:
            self._plan_monitors(req_ids, query_start_loc, computed)
        if not slots.any() and not self._dirty:
            return
        counts = np.diff(query_start_loc[: len(req_ids) + 1])
        n = int(query_start_loc[len(req_ids)])
        staging = self._staging
        staging[: max(n, self._dirty)] = 0
        staging[int(query_start_loc[0]) : n] = np.repeat(slots, counts)
        size = max(n, self._dirty)
        self.token_slot[:size].copy_(torch.from_numpy(staging[:size]), non_blocking=True)
        self._dirty = n if slots.any() else 0

    def _assign(self, req_id: str, state: Any) -> int:
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None)
        parsed = parse_extra_args(extra, self.shape, home=self.home, limits=_NO_LIMITS)
        items = monitor_items(extra) if self.monitors is not None else []
        slot = 0
        prompt_len = len(state.prompt_token_ids or [])
        if parsed is not None or items:
            slot = self._slot_for(parsed, items, prompt_len)
        if items:
            self._columns[req_id] = len(items)
            watch = parse_guard_watch(extra, self.shape, prompt_len, self.home)
            if watch is not None:
                self._watches[req_id] = watch
        self.slot_of[req_id] = slot
        return slot

    def _slot_for(
        self, parsed: ParsedSteering | None, items: list[dict[str, Any]], prompt_len: int
    ) -> int:
        # Requests with the same steering (and prompt length, which positions depend on)
        # and the same monitors share one slot.
        key = json.dumps([parsed.salt if parsed else "", prompt_len, items], sort_keys=True)
        slot = self._key_slot.get(key)
        if slot is None:
            if not self._free:
                raise RuntimeError(
                    f"acteng: all {self.table.slots} steering slots are in use; start vLLM "
                    "with more room (ACTENG_VLLM_SLOTS) or fewer concurrent requests"
                )
            slot = self._free.pop()
            if parsed is not None:
                self.table.set(slot, parsed.specs, prompt_len=prompt_len)
            if items and self.monitors is not None:
                self.monitors.assign(slot, parse_monitors(items, self.shape, self.home))
            self._key_slot[key] = slot
        self._users[slot] = self._users.get(slot, 0) + 1
        return slot

    def _plan_monitors(
        self, req_ids: Sequence[str], query_start_loc: np.ndarray, computed: np.ndarray | None
    ) -> None:
        assert self.monitors is not None
        spans = []
        for i, req_id in enumerate(req_ids):
            columns = self._columns.get(req_id)
            if columns is None:
                continue
            if computed is None:
                raise RuntimeError("acteng: monitors need each request's computed tokens")
            start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
            spans.append(
                Span(req_id, start, end - start, int(computed[i]), columns, self.slot_of[req_id])
            )
        self.monitors.plan(spans, int(query_start_loc[len(req_ids)]))

    def after_step(self) -> None:
        """After the forward call: file the monitored requests' scores, and feed each
        counter-steering guard its generated tokens' scores (a "steer" verdict steers the
        request from its next step on, as in the transformers engine)."""
        if self.monitors is None:
            return
        for span, chunk in self.monitors.after_step():
            watch = self._watches.get(span.req_id)
            if watch is None:
                continue
            for j in range(span.count):
                if span.position + j < watch.prompt_len:
                    continue
                if watch.state.on_token(float(chunk[j, watch.column])) == "steer":
                    self._counter_steer(span.req_id, watch)

    def _counter_steer(self, req_id: str, watch: GuardWatch) -> None:
        columns = self._columns[req_id]
        self.release(req_id)
        parsed = parse_extra_args(watch.steered, self.shape, home=self.home, limits=_NO_LIMITS)
        items = monitor_items(watch.steered)
        self.slot_of[req_id] = self._slot_for(parsed, items, watch.prompt_len)
        self._columns[req_id] = columns
        self._watches[req_id] = watch

    def release(self, req_id: str) -> None:
        slot = self.slot_of.pop(req_id, 0)
        self._columns.pop(req_id, None)
        self._watches.pop(req_id, None)
        if slot == 0:
            return
        self._users[slot] -= 1
        if self._users[slot] == 0:
            del self._users[slot]
            self.table.clear(slot)
            if self.monitors is not None:
                self.monitors.clear(slot)
            self._key_slot = {k: s for k, s in self._key_slot.items() if s != slot}
            self._free.append(slot)


# The front end already enforced the server's limits; the worker only resolves.
_NO_LIMITS = Limits(max_steering=1024)
