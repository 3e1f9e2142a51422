"""Recording residual-stream activations: every requested layer from one forward pass.

Texts are tokenised once, sorted by length, and run in right-padded batches (right padding
keeps position ids exact without passing them). Each batch is stopped right after the
deepest requested block. Per text and layer only the reduced row is kept (the last token,
or the mean over a token span), so memory is ``[N, d_model]`` per layer, never
``[N, layers, seq, d_model]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from acteng.errors import ConfigError
from acteng.hooks import ForwardContext, run_until
from acteng.models import Model
from acteng.pairs import ContrastivePair
from acteng.positions import READ_POSITIONS, ReadSpan, read_span

__all__ = ["Activations", "ReadItem", "pair_items", "parse_layers", "record_activations"]


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


def parse_layers(model: Model, layers: int | str | Sequence[int] | None) -> list[int]:
    """Normalise a layer selection: None/"all", an int, "11-13", "5,7,9" or a list.

    Negative integers count from the end (-1 is the last block).
    """
    n = model.num_layers
    if layers is None or layers == "all":
        return list(range(n))
    if isinstance(layers, str):
        chosen: list[int] = []
        for part in layers.replace(" ", "").split(","):
            lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            try:
                if sep:
                    chosen.extend(range(int(lo), (int(hi) if hi else n - 1) + 1))
                else:
                    chosen.append(int(lo))
            except ValueError:
                raise ConfigError(
                    f"cannot read layers {layers!r}; write 'all', '12', '11-13' or '5,7,9'"
                ) from None
    elif isinstance(layers, int):
        chosen = [layers]
    else:
        chosen = [int(x) for x in layers]
    resolved = [x + n if x < 0 else x for x in chosen]
    bad = [orig for orig, x in zip(chosen, resolved, strict=True) if not 0 <= x < n]
    if bad:
        raise ConfigError(
            f"layer(s) {bad} out of range: {model.name} has layers 0-{n - 1} "
            f"(layer i is the output of block i)"
        )
    if not resolved:
        raise ConfigError("no layers selected; give at least one layer")
    return sorted(set(resolved))


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
) -> Activations:
    """Activations of `texts` at `layers`, reduced at `position`, from one pass per batch.

    >>> acts = acteng.record_activations(model, ["I love it", "I hate it"], layers=[12])
    >>> acts.rows[12].shape
    torch.Size([2, 576])
    """
    if position not in READ_POSITIONS:
        raise ConfigError(f"unknown read position {position!r}; use one of {READ_POSITIONS}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    items = _as_items(texts)
    if not items:
        raise ConfigError("no texts to record; pass at least one text")
    chosen = parse_layers(model, layers)
    encoded = [_encode(model, it) for it in items]
    spans: list[ReadSpan] = []
    for i, (it, (token_ids, offsets)) in enumerate(zip(items, encoded, strict=True)):
        model.check_length(len(token_ids), f"text {i}")
        spans.append(
            read_span(offsets, position, completion_start=it.completion_start, text=it.text)
        )
    n, d = len(items), model.hidden_size
    rows = {layer: torch.empty(n, d, dtype=torch.float32) for layer in chosen}
    order = sorted(range(n), key=lambda i: -len(encoded[i][0]))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    pad_id = int(model.tokenizer.pad_token_id)
    device = model.device
    bar = _progress(len(batches), progress)
    try:
        for batch in batches:
            width = max(len(encoded[i][0]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            weights = torch.zeros((len(batch), width), dtype=torch.float32)  # span averaging
            for row, i in enumerate(batch):
                tokens = encoded[i][0]
                input_ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
                span = spans[i]
                weights[row, span.start : span.end] = 1.0 / (span.end - span.start)
            weights = weights.to(device)
            index = torch.tensor(batch)

            def read(
                layer: int,
                hidden: torch.Tensor,
                _ctx: ForwardContext,
                weights: torch.Tensor = weights,
                index: torch.Tensor = index,
            ) -> None:
                # [batch, pos] x [batch, pos, d] -> [batch, d]
                reduced = torch.einsum("bp,bpd->bd", weights, hidden.float())
                rows[layer][index] = reduced.cpu()

            run_until(
                model.hf,
                model.blocks,
                max(chosen),
                {layer: [read] for layer in chosen},
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
            )
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return Activations(rows=rows, position=position)


def _progress(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="recording activations", unit="batch", leave=False)
