"""The only module in acteng that registers torch hooks.

`attach` registers, inside ``try``, forward hooks on decoder blocks (and optionally on any
other module), keeps every handle and returns a `HookHandle` whose ``remove()`` takes
them all off; `hooked` is the context-manager form that removes them in ``finally``, so no
hook survives an exception. A leaked hook would silently steer every later call.

Block functions see the block's output hidden states ``[batch, q, d_model]`` and a
`ForwardContext` telling, per token, its index in its row (left padding excluded) and the
row's prompt length. The context is computed by a pre-hook on the top-level model from
``attention_mask`` and the KV-cache length, so it is right for prefill, cached decoding
steps and left-padded batches alike.

Engines that run their own model code (vLLM) hook their decoder layers with
`attach_residual_pairs`: such a layer is called with the token positions first and returns
``(hidden, residual)``, whose sum is the residual stream after the block; a `PairFn` sees
both and the positions and returns the new ``hidden`` (the residual passes through).

A compiled decoding step cannot run that pre-hook (it reads lengths into Python ints, a
graph break on every step). With ``graph_safe=True`` each block hook instead builds its
context from the ``position_ids`` the block receives (``generate`` derives them from the
attention mask, so left padding is already excluded): tensor operations only, traceable
by torch.compile. Padding tokens then read as index 0 rather than -1; nothing attends to
them, so steering them changes no output.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "BlockFn",
    "ForwardContext",
    "HookHandle",
    "ModuleFn",
    "PairFn",
    "StopForward",
    "attach",
    "attach_residual_pairs",
    "hooked",
    "run_until",
]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (nothing later is needed)."""


@dataclass
class ForwardContext:
    """Where the tokens of the current forward call sit in their sequences.

    token_index: [batch, q] index of each token in its row, -1 for padding.
    prompt_len:  [batch] real prompt tokens per row, fixed at the prefill call.
    """

    token_index: torch.Tensor | None = None
    prompt_len: torch.Tensor | None = None


# fn(layer, hidden [batch, q, d_model], context) -> replacement hidden, or None to keep it.
BlockFn = Callable[[int, torch.Tensor, ForwardContext], "torch.Tensor | None"]
# fn(module output) -> replacement output, or None to keep it.
ModuleFn = Callable[[Any], Any]
# fn(layer, hidden [tokens, d], residual [tokens, d], positions [tokens]) -> new hidden.
PairFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class HookHandle:
    """Every hook registered by one `attach` call; ``remove()`` takes them all off."""

    handles: list[RemovableHandle] = field(default_factory=list)
    context: ForwardContext = field(default_factory=ForwardContext)

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    @property
    def active(self) -> bool:
        return bool(self.handles)


def _past_length(kwargs: Mapping[str, Any], q: int) -> int:
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() > 0:
        return int(cache_position.reshape(-1)[0])
    # The KV cache, before this call appends to it, holds exactly the past tokens.
    # (transformers 5 passes it as `cache`; older versions as `past_key_values`.)
    for key in ("cache", "past_key_values"):
        past = kwargs.get(key)
        if past is not None and hasattr(past, "get_seq_length"):
            return int(past.get_seq_length())
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return int(mask.shape[1]) - q
    return 0


def _update_context(context: ForwardContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Set `context` for the forward call about to run.

    Token indices come from the 2-D attention mask (left padding -> -1); when the model
    gets a prepared 4-D mask instead (static caches), from the position ids that
    `generate` derived from the 2-D mask; otherwise from the cache length. Any call with
    more than one new token (prefill, a prefill chunk, a new chat turn on a reused cache)
    extends the prompt; single-token calls after it are generated tokens.
    """
    tokens = kwargs.get("input_ids")
    if tokens is None and args and isinstance(args[0], torch.Tensor):
        tokens = args[0]
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if not isinstance(tokens, torch.Tensor):
        context.token_index = context.prompt_len = None
        return
    batch, q = int(tokens.shape[0]), int(tokens.shape[1])
    past = _past_length(kwargs, q)
    mask = kwargs.get("attention_mask")
    positions = kwargs.get("position_ids")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= q:
        mask = mask.to(torch.long)
        index = mask.cumsum(dim=1) - 1  # [batch, past + q]
        index = index.masked_fill(mask == 0, -1)[:, -q:]
        real_lengths = mask.sum(dim=1)
    elif isinstance(positions, torch.Tensor) and positions.dim() == 2:
        index = positions.to(torch.long).expand(batch, q)
        real_lengths = index[:, -1] + 1
    else:
        index = torch.arange(past, past + q, device=tokens.device).expand(batch, q)
        real_lengths = torch.full((batch,), past + q, device=tokens.device)
    stale = context.prompt_len is None or context.prompt_len.shape[0] != batch
    if past == 0 or q > 1 or stale:
        context.prompt_len = real_lengths
    context.token_index = index


def _apply_block_fns(
    layer: int, fns: Sequence[BlockFn], output: Any, context: ForwardContext
) -> Any:
    """Run `fns` on a block's output; the replacement output, or None if none changed it."""
    # Blocks return a tensor in recent transformers, a tuple in older ones.
    hidden = output[0] if isinstance(output, tuple) else output
    changed = False
    for fn in fns:
        new = fn(layer, hidden, context)
        if new is not None:
            hidden, changed = new, True
    if not changed:
        return None
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _make_block_hook(
    layer: int, fns: Sequence[BlockFn], context: ForwardContext
) -> Callable[..., Any]:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        return _apply_block_fns(layer, fns, output, context)

    return hook


def _make_graph_safe_block_hook(layer: int, fns: Sequence[BlockFn]) -> Callable[..., Any]:
    def hook(_module: nn.Module, _args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        positions = kwargs.get("position_ids")
        context = ForwardContext(
            token_index=positions.expand(hidden.shape[0], hidden.shape[1])
            if isinstance(positions, torch.Tensor)
            else None  # this architecture's blocks get no position_ids
        )
        return _apply_block_fns(layer, fns, output, context)

    return hook


def _make_module_hook(fn: ModuleFn) -> Callable[..., Any]:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        return fn(output)

    return hook


@contextmanager
def _all_or_none(handle: HookHandle) -> Iterator[None]:
    """Register hooks into `handle` inside the block; on any failure remove them all."""
    try:
        yield
    except BaseException:
        handle.remove()
        raise


def attach(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    block_fns: Mapping[int, Sequence[BlockFn]],
    *,
    module_fns: Sequence[tuple[nn.Module, ModuleFn]] = (),
    track_positions: bool = False,
    graph_safe: bool = False,
    steering: bool = False,
) -> HookHandle:
    """Register hooks and return their handle; on any failure nothing stays registered.

    `block_fns[i]` run, in order, on the output of ``blocks[i]``. With `track_positions`,
    a pre-hook on `model` keeps the handle's `ForwardContext` current for every call.
    With `graph_safe`, block functions get a context built from the block's own
    ``position_ids`` (token index only, no prompt length) and no pre-hook is registered.
    With `steering`, the block hooks run before every hook on the block that does not
    steer, whenever either was attached (steering hooks keep their own order), so a
    reader always sees the block's output after steering: a monitor opened before a
    ``steer`` reads the same as one opened inside it.
    """
    if graph_safe and track_positions:
        raise ValueError("graph_safe hooks build their own context; drop track_positions")
    handle = HookHandle()
    with _all_or_none(handle):
        if track_positions:

            def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                _update_context(handle.context, args, kwargs)

            handle.handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for layer, fns in sorted(block_fns.items()):
            if not fns:
                continue
            if graph_safe:
                safe = _make_graph_safe_block_hook(layer, list(fns))
                handle.handles.append(blocks[layer].register_forward_hook(safe, with_kwargs=True))
            else:
                hook = _make_block_hook(layer, list(fns), handle.context)
                handle.handles.append(blocks[layer].register_forward_hook(hook))
            if steering:
                _steering_first(blocks[layer], handle.handles[-1].id)
        for module, fn in module_fns:
            handle.handles.append(module.register_forward_hook(_make_module_hook(fn)))
    return handle


# per block, the ids of its steering hooks (those of removed hooks are dropped as it goes)
_STEERING_HOOKS: weakref.WeakKeyDictionary[nn.Module, set[int]] = weakref.WeakKeyDictionary()


def _steering_first(block: nn.Module, hook_id: int) -> None:
    """Mark `hook_id` as steering and reorder `block`'s forward hooks: steering first,
    each group in the order it was registered (torch runs them in dict order)."""
    hooks = block._forward_hooks
    ids = _STEERING_HOOKS.setdefault(block, set())
    ids.intersection_update(hooks)  # forget removed hooks (the server steers every step)
    ids.add(hook_id)
    ordered = sorted(hooks.items(), key=lambda item: item[0] not in ids)  # stable
    hooks.clear()
    hooks.update(ordered)


def _make_pair_hook(layer: int, fn: PairFn) -> Callable[..., Any]:
    def hook(
        _module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = output  # [tokens, d] each; their sum is the stream
        positions = args[0] if args else kwargs["positions"]  # [tokens]
        return fn(layer, hidden, residual, positions), residual

    return hook


def attach_residual_pairs(layers: Sequence[nn.Module], fns: Mapping[int, PairFn]) -> HookHandle:
    """Hook decoder layers that return ``(hidden, residual)`` (vLLM's), `fns[i]` on ``layers[i]``.

    Each layer must take the token positions as its first argument (or ``positions=``).
    As with `attach`, a failure part-way leaves nothing registered. Hooks registered
    before an engine compiles its model are traced into the compiled graph.
    """
    handle = HookHandle()
    with _all_or_none(handle):
        for layer, fn in sorted(fns.items()):
            hook = _make_pair_hook(layer, fn)
            handle.handles.append(layers[layer].register_forward_hook(hook, with_kwargs=True))
    return handle


@contextmanager
def hooked(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    block_fns: Mapping[int, Sequence[BlockFn]],
    *,
    module_fns: Sequence[tuple[nn.Module, ModuleFn]] = (),
    track_positions: bool = False,
    steering: bool = False,
) -> Iterator[HookHandle]:
    """`attach` as a context manager: every hook is removed on exit, error or not."""
    handle = attach(
        model,
        blocks,
        block_fns,
        module_fns=module_fns,
        track_positions=track_positions,
        steering=steering,
    )
    try:
        yield handle
    finally:
        handle.remove()


def run_until(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    last_layer: int,
    block_fns: Mapping[int, Sequence[BlockFn]],
    **inputs: Any,
) -> None:
    """Run a forward pass with `block_fns` and stop right after block `last_layer`.

    Stopping skips the remaining blocks and the unembedding, which readers never need.
    A KV cache passed in `inputs` keeps what the blocks up to `last_layer` wrote.
    """

    def stop(_layer: int, _hidden: torch.Tensor, _ctx: ForwardContext) -> None:
        raise StopForward

    fns = {layer: list(f) for layer, f in block_fns.items()}
    fns.setdefault(last_layer, []).append(stop)
    with hooked(model, blocks, fns), suppress(StopForward):
        model(**{"use_cache": False, **inputs})
