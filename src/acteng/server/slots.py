"""Batch-invariant decoding: a KV cache with one fixed row per slot, and per-row attention.

Why this exists: a request must get the same greedy text alone and among other requests.
Two things in an ordinary padded batch break that in float32 on CPU:

- BLAS picks its matmul kernel by the number of rows M, so a row's result changes (in the
  last bits) with the batch size; at a fixed M it depends on nothing but the row itself.
- Left padding shifts a row's keys inside the attention kernel's vector lanes and blocks,
  which changes its softmax and weighted sums in the last bits.

Last bits are enough to flip a greedy choice after a few dozen tokens. So the engine
prefills each request alone (one row, no padding), decodes all slots together at a fixed
row count (empty slots ride along as dummy rows), keeps each slot's keys at cache indices
``[0, length)`` of its own cache row (no padding in front), and computes attention row by
row over exactly that row's keys with transformers' own SDPA function. A row's arithmetic
is then the same whatever the other slots hold. The buffers are allocated once and written
in place, the layout a compiled decoding step needs.

Supported: causal decoder models with full and sliding-window attention layers, through
the attention they were loaded with, "sdpa" or "eager" (llama, mistral, qwen2/3, phi3,
olmo2, gemma2 with its soft-capping under eager, gemma3). Each row's keys and mask are the
ones transformers' own cache and mask functions give the same request alone: a sliding
layer with window W reads the row's last W cache entries (``DynamicSlidingWindowLayer``
keeps W - 1 and appends the new token) under the mask `masking_utils` builds for them, so
greedy answers equal `acteng.generate`, also past the window. The cache itself keeps every
position of every layer (simple, and ordered as transformers reads them; sliding layers
could keep only W). Other layer types (chunked, linear), bidirectional attention and other
attention implementations are refused with a clear error rather than computed wrongly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from acteng.errors import UnsupportedError
from acteng.models import Model

__all__ = [
    "ATTENTION_NAME",
    "InnerAttention",
    "SlotBatch",
    "SlotCache",
    "check_supported",
    "sdpa_attention",
    "slot_attention",
    "slot_attention_enabled",
]

# The name under which the per-row attention is registered with transformers.
ATTENTION_NAME = "acteng_slots"
# Layer types (transformers' `config.layer_types`) whose attention the slots compute.
SERVED_LAYER_TYPES = ("full_attention", "sliding_attention")

AttentionForward = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class InnerAttention:
    """The attention a model was loaded with, which the slot attention runs for each row.

    name: "sdpa" or "eager"; it also picks transformers' mask function for that kind.
    forward: transformers' function for it (for eager, the one in the model's own module,
    which is where soft-capping lives).
    """

    name: str
    forward: AttentionForward


def sdpa_attention() -> InnerAttention:
    """transformers' SDPA function, the attention of most models (and of the tests)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return InnerAttention("sdpa", sdpa_attention_forward)


@dataclass
class SlotBatch:
    """Which cache rows the current forward call's batch rows use, and where they write.

    slots:  [batch] cache row of each batch row.
    starts: [batch] cache index of each row's first new token (its length so far).
    active: [batch] False for dummy rows (empty slots), whose attention is skipped.
    """

    slots: torch.Tensor
    starts: torch.Tensor
    active: torch.Tensor
    # True for the compiled decoding step: every slot in order, tensors on the model's
    # device written in place, attention as one masked call (no Python per row).
    graph_safe: bool = False
    # The model's own attention, run per row (`check_supported` says which).
    inner: InnerAttention = field(default_factory=sdpa_attention)
    # Per-row masks already built in this forward call, shared by all layers of a kind.
    masks: dict[tuple[int, int, int | None], torch.Tensor | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Plain lists for the per-row Python loop in `slot_attention`.
        self.slot_list: list[int] = [] if self.graph_safe else self.slots.tolist()
        self.start_list: list[int] = [] if self.graph_safe else self.starts.tolist()
        self.active_list: list[bool] = [] if self.graph_safe else self.active.tolist()


def check_supported(model: Model) -> InnerAttention:
    """Refuse models whose attention the slots cannot compute exactly; return the attention
    (transformers' SDPA or the model's eager function) to run per row."""
    config: Any = model.hf.config
    problems = []
    types = set(getattr(config, "layer_types", None) or [])
    if types - set(SERVED_LAYER_TYPES):
        problems.append(f"layer types {sorted(types - set(SERVED_LAYER_TYPES))}")
    if getattr(config, "use_bidirectional_attention", False) or not getattr(
        config, "is_causal", True
    ):
        problems.append("bidirectional attention")
    name = config._attn_implementation
    if name == ATTENTION_NAME:  # a forward call of another engine on this model: the default
        name = "sdpa"
    if name not in ("sdpa", "eager"):
        problems.append(f"attention implementation {name!r} (load it with 'sdpa' or 'eager')")
    elif name != "eager" and getattr(config, "attn_logit_softcapping", None) is not None:
        problems.append("attention logit soft-capping under sdpa (load it with 'eager')")
    inner = sdpa_attention()
    if name == "eager":
        module = sys.modules.get(type(model.hf).__module__)
        forward = getattr(module, "eager_attention_forward", None)
        if forward is None:
            problems.append(f"no eager_attention_forward in {type(model.hf).__module__}")
        else:
            inner = InnerAttention("eager", forward)
    if problems:
        raise UnsupportedError(
            f"the batch-invariant server engine serves causal full and sliding-window "
            f"attention; {model.name} has {', '.join(problems)}; serve a llama, mistral, "
            f"qwen, gemma2/3-style model"
        )
    from transformers import AttentionInterface

    # transformers' registry is by name; registering the same function again is harmless.
    AttentionInterface.register(ATTENTION_NAME, slot_attention)
    return inner


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, heads, q, head_dim]
    key: torch.Tensor,  # [slots, kv_heads, capacity, head_dim]: the whole cache buffer
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of each active row over its own cached keys, as transformers reads them.

    A row with `start` cached tokens and q new ones reads cache indices ``[first, start +
    q)``: ``first`` is 0 on full-attention layers and ``start - window + 1`` (at least 0)
    on a sliding layer, the keys transformers' sliding cache returns. Each row goes through
    the model's attention function alone, with the mask transformers builds for that row,
    so its kernel sees the same shapes, strides and mask as when the request runs alone.
    """
    batch: SlotBatch | None = kwargs.pop("acteng_slots", None)
    if batch is None:
        raise UnsupportedError(
            "acteng's slot attention runs only inside the server engine's forward calls"
        )
    kwargs.pop("is_causal", None)
    # The model passes its layer's window (None on full-attention layers), as it does to
    # transformers' own attention functions.
    window: int | None = kwargs.get("sliding_window")
    if batch.graph_safe:
        return _masked_slot_attention(module, query, key, value, batch, window, **kwargs)
    rows, heads, q, head_dim = query.shape
    out = query.new_zeros(rows, q, heads, head_dim)  # what transformers returns: [b, q, h, d]
    for row in range(rows):
        if not batch.active_list[row]:
            continue
        slot, start = batch.slot_list[row], batch.start_list[row]
        first = 0 if window is None else max(start - window + 1, 0)
        k = key[slot : slot + 1, :, first : start + q]
        v = value[slot : slot + 1, :, first : start + q]
        mask = _row_mask(batch, q, start, first, window, query)
        result, _ = batch.inner.forward(
            module, query[row : row + 1], k, v, mask, is_causal=q > 1, **kwargs
        )
        out[row] = result[0]
    return out, None


def _row_mask(
    batch: SlotBatch,
    q: int,
    start: int,
    first: int,
    window: int | None,
    like: torch.Tensor,
) -> torch.Tensor | None:
    """transformers' mask for one row: q queries from position `start` over the keys at
    positions ``[first, start + q)`` (None where it lets SDPA's ``is_causal`` do it)."""
    key = (q, start, window)
    if key not in batch.masks:
        from transformers.masking_utils import (
            ALL_MASK_ATTENTION_FUNCTIONS,
            causal_mask_function,
            sliding_window_causal_mask_function,
        )

        batch.masks[key] = ALL_MASK_ATTENTION_FUNCTIONS[batch.inner.name](
            batch_size=1,
            q_length=q,
            kv_length=start + q - first,
            q_offset=start,
            kv_offset=first,
            mask_function=(
                causal_mask_function
                if window is None
                else sliding_window_causal_mask_function(window)
            ),
            attention_mask=None,
            local_size=window,
            dtype=like.dtype,
            device=like.device,
        )
    return batch.masks[key]


def _masked_slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    batch: SlotBatch,
    window: int | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The compiled step's attention: one decoding token per slot, all slots at once.

    Batch row i is slot i; it sees its cache indices ``[0, start + 1)`` (on a sliding
    layer only the last `window` of them) through a mask over the whole buffer, so the
    shapes never change and nothing runs in Python per row. (Not batch-invariant in the
    last bits, unlike the loop above: the compiled path is for half precision on GPUs,
    where no kernel is.)
    """
    if query.shape[2] != 1:
        raise UnsupportedError("the graph-safe slot attention decodes one token per slot")
    index = torch.arange(key.shape[2], device=key.device)[None, :]  # [1, capacity]
    starts = batch.starts[:, None]  # [slots, 1]
    visible = index <= starts
    if window is not None:
        visible = visible & (index > starts - window)
    mask = visible[:, None, None, :]  # [slots, 1, 1, capacity]
    if batch.inner.name == "eager":  # eager functions add the mask to the scores
        low = torch.finfo(query.dtype).min
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=key.device).masked_fill_(
            ~mask, low
        )
    return batch.inner.forward(module, query, key, value, mask, is_causal=False, **kwargs)


class _SlotLayer(CacheLayerMixin):  # type: ignore[misc,no-untyped-call,unused-ignore]
    """One layer's keys and values: ``[slots, kv_heads, capacity, head_dim]`` buffers."""

    is_sliding = False

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()  # type: ignore[no-untyped-call,unused-ignore]
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Uninitialised on purpose: a row only ever reads the indices it wrote, and the
        # untouched rest of a large buffer then costs no memory. The masked attention of
        # the compiled step does multiply unread values by zero weights, so garbage NaNs
        # would leak into it: its cache is zeroed.
        shape = (self.owner.slots, key_states.shape[1], self.owner.capacity)
        make = key_states.new_zeros if self.owner.zeroed else key_states.new_empty
        self.keys = make(*shape, key_states.shape[-1])
        self.values = make(*shape, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.owner.batch
        if batch is None:
            raise UnsupportedError("the slot cache was used outside the server engine")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        if keys is None or values is None:  # lazy_initialization always sets both
            raise UnsupportedError("the slot cache has no buffers; this is a bug")
        q = key_states.shape[2]
        if q == 1:
            # Decoding: every row writes its one new token at its own length.
            keys[batch.slots, :, batch.starts] = key_states[:, :, 0]
            values[batch.slots, :, batch.starts] = value_states[:, :, 0]
        else:
            for row, (slot, start) in enumerate(
                zip(batch.slot_list, batch.start_list, strict=True)
            ):
                keys[slot, :, start : start + q] = key_states[row]
                values[slot, :, start : start + q] = value_states[row]
        return keys, values

    def get_seq_length(self) -> int:
        return 0  # rows have their own lengths; position ids are always passed explicitly

    def get_max_length(self) -> int:
        return self.owner.capacity

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.capacity, 0


class SlotCache(Cache):  # type: ignore[misc,unused-ignore]  # transformers may be untyped
    """A transformers-compatible KV cache with `slots` fixed rows of `capacity` tokens.

    The engine sets `batch` before each forward call; rows never share cache memory.
    """

    def __init__(self, num_layers: int, slots: int, capacity: int, *, zeroed: bool = False) -> None:
        self.slots, self.capacity, self.zeroed = slots, capacity, zeroed
        self.batch: SlotBatch | None = None
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def buffers(self) -> list[torch.Tensor]:
        """The key and value buffers allocated so far (by the first forward call)."""
        found: list[torch.Tensor] = []
        for layer in self.layers:
            if isinstance(layer, _SlotLayer) and layer.is_initialized:
                found += [t for t in (layer.keys, layer.values) if t is not None]
        return found


@contextmanager
def slot_attention_enabled(model: Model) -> Iterator[None]:
    """Route the model's attention through `slot_attention` inside the block only."""
    config: Any = model.hf.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before
