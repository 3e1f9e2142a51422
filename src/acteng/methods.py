"""Extraction algorithms, registered by name: ``METHODS[name](pos, neg) -> direction``.

Each takes the positive and negative activations at one layer, ``[N, d_model]`` float64
(row i of both comes from pair i), and returns a ``[d_model]`` direction pointing from
negative to positive.

- ``actadd``    ActAdd (Turner et al.): the difference of one pair's activations.
- ``mean_diff`` CAA (Rimsky et al.): mean(positive) - mean(negative).
- ``pca``       RepE (Zou et al.): first principal component of the paired differences,
                uncentred (equivalent to RepE's random sign flips), sign aligned with the
                mean difference.
- ``probe``     logistic regression separating positives from negatives (L2, LBFGS).

``pca`` and ``probe`` return unit directions scaled to the mean difference's projection on
them, so one coefficient means roughly the same strength across methods.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from acteng.errors import ConfigError

__all__ = ["METHODS", "Method", "register_method"]

Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS: dict[str, Method] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    """Register an extraction method under `name` (used by `acteng.extract`)."""

    def decorate(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return decorate


def _scaled_to_mean_diff(unit: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    mean_diff = pos.mean(0) - neg.mean(0)
    projection = torch.dot(mean_diff, unit)
    if projection < 0:  # point from negative to positive
        unit, projection = -unit, -projection
    return unit * projection


@register_method("actadd")
def actadd(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    if pos.shape[0] != 1:
        raise ConfigError(
            "actadd takes exactly one pair (a prompt pair like 'I love this' / 'I hate "
            f"this'), got {pos.shape[0]}; use method 'mean_diff' for several pairs"
        )
    return pos[0] - neg[0]


@register_method("mean_diff")
def mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    return pos.mean(0) - neg.mean(0)


@register_method("pca")
def pca(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    diffs = pos - neg  # [N, d]
    if pos.shape[0] < 2:
        raise ConfigError("pca needs at least 2 pairs; use 'actadd' for a single pair")
    # Top right-singular vector of the difference matrix = top eigenvector of D^T D.
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    return _scaled_to_mean_diff(vh[0], pos, neg)


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    l2: float,
    steps: int,
    positive_weight: torch.Tensor | None = None,
    overwrite: bool = False,
) -> tuple[torch.Tensor, float]:
    """L2-penalised logistic regression of `y` on `x` (LBFGS); returns (w, b) on x's own
    scale, logit = x @ w + b. Features are standardised first so the penalty and LBFGS
    behave the same at every layer's scale; `positive_weight` weighs the positive class.
    ``overwrite=True`` standardises `x` itself instead of a copy (same values): for a
    caller whose `x` is a copy it no longer needs, as token probes fit millions of rows."""
    mu, sigma = x.mean(0), x.std(0).clamp_min(1e-6)
    z = x.sub_(mu) if overwrite else x - mu
    z.div_(sigma)
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = z @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y, pos_weight=positive_weight
        )
        loss = loss + l2 * (w * w).sum() / len(y)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with torch.enable_grad():
        optimizer.step(closure)  # type: ignore[no-untyped-call]
    raw = w.detach() / sigma  # back to x's scale
    return raw, float(b.detach()) - float(raw @ mu)


@register_method("probe")
def probe(
    pos: torch.Tensor, neg: torch.Tensor, *, l2: float = 1e-2, steps: int = 100
) -> torch.Tensor:
    if pos.shape[0] < 2:
        raise ConfigError("probe needs at least 2 pairs; use 'actadd' for a single pair")
    x = torch.cat([pos, neg])  # [2N, d]
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(x)
    direction, _ = fit_logistic(x, y, l2=l2, steps=steps)
    norm = direction.norm()
    if norm == 0:
        raise ConfigError(
            "probe found no separating direction (identical positives and "
            "negatives?); check the dataset"
        )
    return _scaled_to_mean_diff(direction / norm, pos, neg)
