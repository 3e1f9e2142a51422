"""Reading block outputs for training losses: one forward pass over right-padded token
lists that stops after the highest block a loss needs, with the mask of the tokens each
row's loss may use."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from acteng.activations import right_padded
from acteng.hooks import ForwardContext, run_until
from acteng.models import Model

__all__ = ["BlockReader"]


class BlockReader:
    """Block outputs at `layers` from one forward pass that stops after the last of them;
    gradients flow when enabled."""

    def __init__(self, model: Model, layers: Sequence[int]) -> None:
        self.model = model
        self.layers = sorted(layers)
        self.pad = int(model.tokenizer.pad_token_id or 0)

    def __call__(
        self, batch: list[list[int]], starts: Sequence[int]
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """(block outputs by layer [b, t, d], mask of the tokens from each row's start)."""
        ids, mask = right_padded(batch, self.pad)
        seen: dict[int, torch.Tensor] = {}

        def keep(layer: int, hidden: torch.Tensor, _ctx: ForwardContext) -> None:
            seen[layer] = hidden

        run_until(
            self.model.hf,
            self.model.blocks,
            self.layers[-1],
            {layer: [keep] for layer in self.layers},
            input_ids=ids.to(self.model.device),
            attention_mask=mask.to(self.model.device),
        )
        used = mask.bool().to(self.model.device)
        for row, start in enumerate(starts):
            used[row, :start] = False
        return {k: v.float() for k, v in seen.items()}, used

    def before_start(self, batch: list[list[int]], starts: Sequence[int]) -> torch.Tensor:
        """Mask of each row's tokens before its start (padding excluded), in the layout
        `__call__` returns."""
        width = max(len(row) for row in batch)
        held = torch.zeros(len(batch), width, dtype=torch.bool, device=self.model.device)
        for row, (ids, start) in enumerate(zip(batch, starts, strict=True)):
            held[row, : min(start, len(ids))] = True
        return held

    @torch.no_grad()
    def centre_and_spread(
        self, rows: list[list[int]], start: int, chunk: int = 16
    ) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
        """Each layer's mean block output and the median norm of the outputs minus it,
        over the tokens of `rows` from `start` on (the model as it is now: call it
        before an adapter is trained)."""
        seen: dict[int, list[torch.Tensor]] = {x: [] for x in self.layers}
        for first in range(0, len(rows), chunk):
            part = rows[first : first + chunk]
            hidden, used = self(part, [start] * len(part))
            for x in self.layers:
                seen[x].append(hidden[x][used])
        mu = {x: torch.cat(v).mean(0) for x, v in seen.items()}
        spread = {
            x: float((torch.cat(v) - mu[x]).norm(dim=-1).median().clamp_min(1e-6))
            for x, v in seen.items()
        }
        return mu, spread
