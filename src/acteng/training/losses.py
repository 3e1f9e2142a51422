"""The circuit-breaker losses (Zou et al. 2024) on block outputs read by `BlockReader`.

`reroute_loss` is the paper's ReLU(cos) between the adapted and the frozen
representations, centred on each layer's retain mean; `retain_loss` the L2 distance
between them, relative to each layer's spread (see `acteng.training.circuit_breaker`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Hidden", "reroute_loss", "retain_loss"]

Hidden = dict[int, torch.Tensor]


def reroute_loss(
    now: Hidden, frozen: Hidden, used: torch.Tensor, mu: Hidden, targets: Sequence[int]
) -> torch.Tensor:
    """Mean over the target layers of ReLU(cos) between the adapted and frozen
    representations, both centred on the layer's retain mean, over the used tokens."""
    per_layer = [
        torch.relu(
            nn.functional.cosine_similarity(now[x] - mu[x], frozen[x] - mu[x], dim=-1)[used]
        ).mean()
        for x in targets
    ]
    return torch.stack(per_layer).mean()


def retain_loss(
    now: Hidden,
    frozen: Hidden,
    used: torch.Tensor,
    scale: dict[int, float],
    held: torch.Tensor | None = None,
    apart: int = 0,
) -> torch.Tensor:
    """Mean over layers of the L2 distance between the adapted and frozen representations
    over the used tokens, each layer's divided by its median centred norm; plus, over the
    `held` tokens (those before each row's start: the shared template prefix, a plain
    text's first token), the same distance relative to each token's own frozen norm.

    The first `apart` rows (a step's harmful look-alikes) are a term of their own, added
    to the other rows': in one mean they halved the weight of the usual retain batch,
    plain text with it, and neutral-text perplexity rose (39 % against 4 %, README).

    The held tokens are the attention sink and what every conversation shares, so no loss
    may use them as a lever; left out of the retain loss, they drifted by ~99 % (relative)
    and every later token with them (neutral-text perplexity x26). Their own norm is the
    scale because the sink's is ~100 times the layer's median."""
    if apart:
        first = torch.arange(used.shape[0], device=used.device)[:, None] < apart
        alike = retain_loss(now, frozen, used & first, scale)
        return alike + retain_loss(now, frozen, used & ~first, scale, held)
    per_layer = [((now[x] - frozen[x]).norm(dim=-1)[used] / scale[x]).mean() for x in scale]
    loss = torch.stack(per_layer).mean()
    if held is not None and bool(held.any()):
        relative = [
            ((now[x] - frozen[x]).norm(dim=-1) / frozen[x].norm(dim=-1).clamp_min(1e-6))[
                held
            ].mean()
            for x in scale
        ]
        loss = loss + torch.stack(relative).mean()
    return loss
