"""Understanding vectors: what they promote, where a concept is readable, how they relate.

- `vocab_projection`: logit lens of a vector. Each layer's direction goes through the
  model's final norm and unembedding, as the residual stream does at the last layer; the
  logits, centred over the vocabulary, name the tokens it promotes and suppresses.
- `readability`: per layer, a probe trained on the train split and scored on the test
  split (AUROC and accuracy at the midpoint): where the concept is linearly readable.
- `layer_cosines` / `vector_cosines`: cosine similarity across a vector's layers, and
  between vectors at a layer.
- `pca_scatter`: 2-D PCA coordinates of positive and negative activations at a layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from acteng.activations import record_pairs
from acteng.errors import ConfigError
from acteng.evaluation.metrics import auroc
from acteng.layer_selection import parse_layers
from acteng.layouts import get_submodule
from acteng.methods import METHODS
from acteng.models import Model
from acteng.pairs import Pairs, load_pairs
from acteng.vectors import SteeringVector

__all__ = ["layer_cosines", "pca_scatter", "readability", "vector_cosines", "vocab_projection"]


@torch.no_grad()
def vocab_projection(
    model: Model, vector: SteeringVector, *, layers: Sequence[int] | None = None, k: int = 10
) -> dict[int, dict[str, list[tuple[str, float]]]]:
    """Per layer: the `k` tokens the direction promotes most and suppresses most."""
    vector.check_compatible(model)
    chosen = list(layers) if layers is not None else list(vector.layers)
    norm = get_submodule(model.hf, model.layout.final_norm)
    unembed = get_submodule(model.hf, model.layout.unembed)
    out = {}
    for layer in chosen:
        direction = vector[layer].to(model.device, model.dtype)
        if float(direction.norm()) == 0.0:
            raise ConfigError(f"layer {layer} of the vector is zero; nothing to project")
        logits = unembed(norm(direction[None, None, :]))[0, 0].double().cpu()
        logits -= logits.mean()
        top, bottom = torch.topk(logits, k), torch.topk(-logits, k)
        decode = model.tokenizer.decode
        out[layer] = {
            "promoted": [(decode([int(i)]), float(v)) for v, i in zip(*top, strict=True)],
            "suppressed": [(decode([int(i)]), -float(v)) for v, i in zip(*bottom, strict=True)],
        }
    return out


def readability(
    model: Model,
    pairs: Pairs | str | Any,
    layers: int | str | Sequence[int] | None = None,
    *,
    position: str = "last",
) -> list[dict[str, float]]:
    """Held-out probe AUROC and accuracy per layer (train split -> test split)."""
    dataset = load_pairs(pairs)
    if not any(p.split == "test" for p in dataset):
        raise ConfigError("readability needs a dataset with a test split to score on")
    train, test = dataset.split("train"), dataset.split("test")
    if len(train) < 2 or len(test) < 1:
        raise ConfigError("readability needs at least 2 train pairs and 1 test pair")
    chosen = parse_layers(model, layers)
    fit_pos, fit_neg = record_pairs(model, train, chosen, position)
    held_pos, held_neg = record_pairs(model, test, chosen, position)
    rows = []
    for layer in chosen:
        pos, neg = fit_pos[layer], fit_neg[layer]
        w = METHODS["probe"](pos, neg)
        unit = w / w.norm().clamp_min(1e-12)
        mid = float(((pos.mean(0) + neg.mean(0)) / 2) @ unit)
        p, q = held_pos[layer] @ unit - mid, held_neg[layer] @ unit - mid
        accuracy = float(torch.cat([(p > 0).double(), (q <= 0).double()]).mean())
        rows.append({"layer": layer, "auroc": auroc(p, q), "accuracy": accuracy})
    return rows


def layer_cosines(vector: SteeringVector) -> list[list[float]]:
    """Cosine similarity between every pair of the vector's layers (in layer order)."""
    stacked = torch.stack([vector[x].double() for x in vector.layers])
    unit = stacked / stacked.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).tolist()  # type: ignore[no-any-return]


def vector_cosines(vectors: Mapping[str, SteeringVector], layer: int) -> list[list[float]]:
    """Cosine similarity between vectors at one layer (in the mapping's order)."""
    missing = [name for name, v in vectors.items() if layer not in v.directions]
    if missing:
        raise ConfigError(f"vector(s) {missing} have no layer {layer}")
    stacked = torch.stack([v[layer].double() for v in vectors.values()])
    unit = stacked / stacked.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).tolist()  # type: ignore[no-any-return]


def pca_scatter(
    model: Model, pairs: Pairs | str | Any, layer: int, *, position: str = "last"
) -> dict[str, list[list[float]]]:
    """2-D PCA coordinates of positive and negative activations at `layer`."""
    dataset = load_pairs(pairs)
    chosen = parse_layers(model, [layer])
    pos, neg = record_pairs(model, dataset, chosen, position)
    n = len(dataset)
    rows = torch.cat([pos[chosen[0]], neg[chosen[0]]])
    centred = rows - rows.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    coords = centred @ vh[:2].T
    return {"positive": coords[:n].tolist(), "negative": coords[n:].tolist()}
