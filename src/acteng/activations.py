"""Recording residual-stream activations: every requested layer from one forward pass.

Texts are tokenised once, sorted by length, and run in right-padded batches (right padding
keeps position ids exact without passing them). Each batch is stopped right after the
deepest requested block. Per text and layer only the reduced row is kept (the last token,
or the mean over a token span), so memory is ``[N, d_model]`` per layer, never
``[N, layers, seq, d_model]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch

from acteng.backends import BackendChoice, resolve_backend
from acteng.batching import BatchPlan, plan_batches
from acteng.errors import ConfigError
from acteng.hooks import ForwardContext, run_until
from acteng.layer_selection import parse_layers
from acteng.models import Model
from acteng.pairs import ContrastivePair
from acteng.positions import READ_POSITIONS, ReadSpan, read_span

__all__ = [
    "Activations",
    "ReadItem",
    "RecordBatch",
    "pair_items",
    "record_activations",
    "record_batch",
    "record_pairs",
    "record_token_matrix",
    "record_tokens",
    "right_padded",
    "token_offsets",
]


@dataclass(frozen=True)
class ReadItem:
    """A text to read, with where its completion starts (0: the whole text is read).

    `rendered` marks text produced by the chat template, which already holds its special
    tokens (the tokenizer must not add a second BOS).
    """

    text: str
    completion_start: int = 0
    rendered: bool = False


@dataclass(frozen=True)
class Activations:
    """Reduced activations: ``rows[layer]`` is ``[N, d_model]`` float32, in input order."""

    rows: dict[int, torch.Tensor]
    position: str

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.rows))

    def __len__(self) -> int:
        return int(next(iter(self.rows.values())).shape[0]) if self.rows else 0


def pair_items(
    model: Model, pairs: Sequence[ContrastivePair]
) -> tuple[list[ReadItem], list[ReadItem]]:
    """The positive and negative texts of `pairs`, rendered for this model.

    A pair with a prompt becomes the chat-rendered prompt followed by the completion, with
    no end-of-turn: the state the model is in while writing that answer.
    """
    positives, negatives = [], []
    for pair in pairs:
        if pair.prompt is None:
            positives.append(ReadItem(pair.positive))
            negatives.append(ReadItem(pair.negative))
            continue
        rendered = model.render_prompt(pair.prompt)
        start = len(rendered)
        positives.append(ReadItem(rendered + pair.positive, start, rendered=True))
        negatives.append(ReadItem(rendered + pair.negative, start, rendered=True))
    return positives, negatives


def record_pairs(
    model: Model,
    pairs: Sequence[ContrastivePair],
    layers: Sequence[int],
    position: str,
    **options: Any,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Positive and negative activations of `pairs` per layer (float64), from one
    `record_activations` call; `options` go to it (batch_size, progress)."""
    positives, negatives = pair_items(model, pairs)
    acts = record_activations(model, positives + negatives, layers, position, **options)
    n = len(pairs)
    pos = {x: acts.rows[x][:n].double() for x in layers}
    neg = {x: acts.rows[x][n:].double() for x in layers}
    return pos, neg


def _encode(model: Model, item: ReadItem) -> tuple[list[int], list[tuple[int, int]]]:
    enc = model.tokenizer(
        item.text,
        add_special_tokens=not item.rendered,
        return_offsets_mapping=True,
    )
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    return ids, offsets


def _as_items(texts: Sequence[str | ReadItem]) -> list[ReadItem]:
    if isinstance(texts, str | ReadItem):  # one text, not its characters
        texts = [texts]
    items = [t if isinstance(t, ReadItem) else ReadItem(t) for t in texts]
    empty = [i for i, it in enumerate(items) if not it.text]
    if empty:
        raise ConfigError(f"text(s) at index {empty} are empty; remove them")
    return items


@torch.no_grad()
def record_activations(
    model: Model,
    texts: Sequence[str | ReadItem],
    layers: int | str | Sequence[int] | None = None,
    position: str = "last",
    *,
    batch_size: int = 32,
    progress: bool = False,
    share_prefix: bool = True,
    backend: BackendChoice = "local",
) -> Activations:
    """Activations of `texts` at `layers`, reduced at `position`, from one pass per batch.

    With `share_prefix` (the default) tokens that several texts share and that are not
    read (the chat template, a pair's prompt) are computed once (see `acteng.batching`).
    `backend` runs the batches (``"local"``, ``"ray"``, a `RayBackend`; see
    `acteng.backends`): each is one `record_batch` call, so the rows are the same.

    >>> acts = acteng.record_activations(model, ["I love it", "I hate it"], layers=[12])
    >>> acts.rows[12].shape
    torch.Size([2, 576])
    """
    if position not in READ_POSITIONS:
        raise ConfigError(
            f"unknown read position {position!r}; use one of {', '.join(READ_POSITIONS)}"
        )
    runner = resolve_backend(backend)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    items = _as_items(texts)
    if not items:
        raise ConfigError("no texts to record; pass at least one text")
    chosen = parse_layers(model, layers)
    encoded = [_encode(model, it) for it in items]
    spans: list[ReadSpan] = []
    for i, (it, (ids, offsets)) in enumerate(zip(items, encoded, strict=True)):
        model.check_length(len(ids), f"text {i}")
        spans.append(
            read_span(offsets, position, completion_start=it.completion_start, text=it.text)
        )
    n, d = len(items), model.hidden_size
    rows = {layer: torch.empty(n, d, dtype=torch.float32) for layer in chosen}
    token_ids = [ids for ids, _ in encoded]
    share = share_prefix and cache_keeps_all(model, max(map(len, token_ids)))
    if share:
        shareable = [
            _prompt_tokens(offsets, it.completion_start)
            for it, (_, offsets) in zip(items, encoded, strict=True)
        ]
        read_starts = [span.start for span in spans]
    else:  # nothing may come from a cache: no global prefix, no group keys
        shareable = read_starts = [0] * n
    global_ids, plans = plan_batches(token_ids, shareable, read_starts, batch_size)
    batches = [
        RecordBatch(plan, tuple(spans[t] for t in plan.texts), global_ids, tuple(chosen))
        for plan in plans
    ]
    label = "recording activations" if progress else None
    for batch, reduced in zip(
        batches, runner.map(model, record_batch, batches, progress=label), strict=True
    ):
        index = torch.tensor(batch.plan.texts)
        for layer in chosen:
            rows[layer][index] = reduced[layer]
    return Activations(rows=rows, position=position)


def _prompt_tokens(offsets: list[tuple[int, int]], completion_start: int) -> int:
    """How many leading tokens lie wholly before the completion (0 without a prompt)."""
    if completion_start <= 0:
        return 0
    return next((i for i, (_, end) in enumerate(offsets) if end > completion_start), len(offsets))


def right_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: ids [n, width] and mask [n, width]."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _cache_argument(hf: torch.nn.Module) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (5.24 warns on the old name).
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class RecordBatch:
    """One batch of a recording: what `record_batch` needs, and all a worker receives."""

    plan: BatchPlan
    spans: tuple[ReadSpan, ...]  # the read span of each of plan.texts, in that order
    global_ids: list[int]  # the prefix every text of the recording shares
    layers: tuple[int, ...]


def cache_keeps_all(model: Model, longest: int) -> bool:
    """Whether a KV cache of `model` keeps every token of texts up to `longest` tokens
    (sliding-window caches drop old ones, so sharing a prefix would change the result)."""
    window = getattr(model.hf.config, "sliding_window", None)
    return window is None or longest <= window


@torch.no_grad()
def run_shared(
    model: Model, plan: BatchPlan, global_ids: list[int], last_layer: int | None
) -> dict[str, Any]:
    """Stages 1 and 2 of a plan (see acteng.batching): the prefix every text shares, once,
    then each group's shared part, once per group, into one KV cache, expanded to the
    plan's suffix rows.

    Blocks after `last_layer` are skipped (readers need no more; None runs the whole model
    without computing logits). Returns the forward arguments of stage 3, on the model's
    device: the suffixes (right padded), their attention mask over cached and own tokens,
    their positions, and the cache (absent when nothing is shared). Hooks active around
    the call see every stage, as in one full pass.
    """
    from transformers import DynamicCache

    device = model.device
    pad_id = int(model.tokenizer.pad_token_id)
    n_groups = len(plan.keys)
    has_keys = any(plan.keys)
    cache: Any = None  # a transformers DynamicCache when anything is shared
    cached: dict[str, Any] = {}
    if global_ids or has_keys:
        config: Any = model.hf.config
        cache = DynamicCache(config=config)
        cached = {_cache_argument(model.hf): cache, "use_cache": True}

    def run(**inputs: Any) -> None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if last_layer is None:
            model.hf(**inputs, **cached, logits_to_keep=1)
        else:
            run_until(model.hf, model.blocks, last_layer, {}, **inputs, **cached)

    past_mask = torch.ones((1, len(global_ids)), dtype=torch.long)
    if global_ids:  # stage 1: the prefix every text shares, once
        run(input_ids=torch.tensor([global_ids]), attention_mask=past_mask)
        cache.reorder_cache(torch.zeros(n_groups, dtype=torch.long, device=device))
    past_mask = past_mask.expand(n_groups, -1)
    if has_keys:  # stage 2: each group's shared prompt, once per group
        key_ids, key_mask = right_padded(plan.keys, pad_id)
        positions = len(global_ids) + torch.arange(key_ids.shape[1]).expand(n_groups, -1)
        past_mask = torch.cat([past_mask, key_mask], dim=1)
        run(input_ids=key_ids, attention_mask=past_mask, position_ids=positions)
    group = torch.tensor(plan.group_of_row, dtype=torch.long)
    if cache is not None:
        cache.reorder_cache(group.to(device))
    past_mask = past_mask[group]
    ids, mask = right_padded(plan.suffixes, pad_id)
    positions = past_mask.sum(dim=1, keepdim=True) + torch.arange(ids.shape[1])
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.cat([past_mask, mask], dim=1).to(device),
        "position_ids": positions.to(device),
        **cached,
    }


@torch.no_grad()
def record_batch(model: Model, batch: RecordBatch) -> dict[int, torch.Tensor]:
    """The reduced rows ``{layer: [len(plan.texts), d_model]}`` float32 of one batch, run in
    up to three stages over one KV cache (see acteng.batching). Both backends call this."""
    plan, chosen = batch.plan, batch.layers
    last = max(chosen)
    inputs = run_shared(model, plan, batch.global_ids, last)
    # stage 3: every text's own tokens, where all reading happens
    weights = torch.zeros(inputs["input_ids"].shape, dtype=torch.float32)  # span averaging
    for row, (span, offset) in enumerate(zip(batch.spans, plan.offsets, strict=True)):
        weights[row, span.start - offset : span.end - offset] = 1.0 / (span.end - span.start)
    weights = weights.to(model.device)
    out: dict[int, torch.Tensor] = {}

    def read(layer: int, hidden: torch.Tensor, _ctx: ForwardContext) -> None:
        # [batch, pos] x [batch, pos, d] -> [batch, d]
        out[layer] = torch.einsum("bp,bpd->bd", weights, hidden.float()).cpu()

    run_until(model.hf, model.blocks, last, {layer: [read] for layer in chosen}, **inputs)
    return out


@torch.no_grad()
def record_tokens(
    model: Model,
    texts: Sequence[str | ReadItem],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Every token's activations over the span ``position="mean"`` averages (a text's
    completion, or all of it), unreduced: per text ``[tokens, len(layers), d_model]``
    float32, layers in the order given. For token-level detectors (`acteng.token_detector`),
    which train on single tokens and pool their scores; keep the texts few enough to fit.
    The tensors are views of one `record_token_matrix` matrix.
    """
    tokens, offsets = record_token_matrix(model, texts, layers, batch_size=batch_size)
    shape = (len(layers), model.hidden_size)
    return [tokens[start:end].view(end - start, *shape) for start, end in pairwise(offsets)]


@torch.no_grad()
def record_token_matrix(
    model: Model,
    texts: Sequence[str | ReadItem],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
) -> tuple[torch.Tensor, list[int]]:
    """`record_tokens` packed into one float32 matrix ``[all tokens, len(layers) * d_model]``
    (each token's layers side by side, in the order given) and the offsets where each
    text's rows start (text i is rows ``offsets[i]:offsets[i + 1]``). The matrix is
    allocated once, before any forward pass: a probe fitted on millions of token rows
    never holds per-text pieces and their concatenation at the same time."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    items = _as_items(texts)
    chosen = list(layers)
    encoded = [_encode(model, it) for it in items]
    spans = []
    for i, (it, (ids, offsets)) in enumerate(zip(items, encoded, strict=True)):
        model.check_length(len(ids), f"text {i}")
        spans.append(read_span(offsets, "mean", completion_start=it.completion_start, text=it.text))
    starts = [0]
    for span in spans:
        starts.append(starts[-1] + span.end - span.start)
    tokens = torch.empty(starts[-1], len(chosen) * model.hidden_size)
    order = sorted(range(len(items)), key=lambda i: len(encoded[i][0]))  # less padding
    pad = model.tokenizer.pad_token_id
    pad = pad if pad is not None else model.tokenizer.eos_token_id
    seen: dict[int, torch.Tensor] = {}

    def read(layer: int, hidden: torch.Tensor, _ctx: ForwardContext) -> None:
        seen[layer] = hidden.float().cpu()

    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        batch_ids, mask = right_padded([encoded[i][0] for i in batch], int(pad))
        run_until(
            model.hf,
            model.blocks,
            max(chosen),
            {layer: [read] for layer in chosen},
            input_ids=batch_ids.to(model.device),
            attention_mask=mask.to(model.device),
        )
        stacked = torch.stack([seen[layer] for layer in chosen], 2)  # [b, pos, L, d]
        for row, i in enumerate(batch):
            rows = stacked[row, spans[i].start : spans[i].end]
            tokens[starts[i] : starts[i + 1]] = rows.flatten(1)
    return tokens, starts


def token_offsets(model: Model, texts: Sequence[str | ReadItem]) -> list[list[tuple[int, int]]]:
    """Per text, the character span of each token `record_tokens` returns, counted from
    the start of the completion (so a pair's sides can be compared by character)."""
    out = []
    for it in _as_items(texts):
        _, offsets = _encode(model, it)
        span = read_span(offsets, "mean", completion_start=it.completion_start, text=it.text)
        start = it.completion_start
        out.append([(a - start, b - start) for a, b in offsets[span.start : span.end]])
    return out
