"""Model-diff vectors: what an edit changed, as a steering vector of the base model.

``diff_vector(model, adapted, prompts)`` is the mean activation of the adapted model minus
that of the base model on the same prompts, per layer (each prompt's tokens averaged, then
the prompts). It is a `SteeringVector` made for the base model, so everything that takes a
vector takes it: `acteng.monitor` scores how strongly a conversation carries the edit,
`acteng.evaluation.analysis` shows what it promotes in the vocabulary, a detector can be
trained on it, and ``mode="ablate"`` with it is the "junk direction" attack on RMU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from acteng.activations import record_activations
from acteng.errors import ConfigError
from acteng.models import Model, load_model
from acteng.training.adapters import read_provenance
from acteng.vectors import SteeringVector

__all__ = ["diff_vector"]


def diff_vector(
    model: Model,
    adapted: Model | str | os.PathLike[str],
    prompts: Sequence[str],
    *,
    layers: int | str | Sequence[int] | None = None,
    position: str = "mean",
    batch_size: int = 16,
) -> SteeringVector:
    """Mean activation difference ``adapted - model`` on `prompts` at `layers` (all by
    default). `adapted` is a loaded model of the same shape or an adapter folder, loaded
    on top of `model`'s source.

    >>> v = acteng.diff_vector(model, "rmu-cooking", prompts)
    >>> acteng.monitor(model, "Tell me about Jupiter", v)
    """
    if not prompts:
        raise ConfigError("diff_vector needs at least one prompt")
    adapter_name: str | None = None
    provenance: dict[str, object] = {}
    if not isinstance(adapted, Model):
        folder = os.fspath(adapted)
        recipe = model.recipe
        if recipe is None or recipe.adapter is not None:
            raise ConfigError(
                "diff_vector can load an adapter only on a model from acteng.load_model "
                "without an adapter; pass the adapted model itself instead"
            )
        adapter_name, provenance = folder, read_provenance(folder)
        adapted = load_model(
            recipe.source, adapter=folder, dtype=recipe.dtype, device=recipe.device
        )
    if (adapted.num_layers, adapted.hidden_size) != (model.num_layers, model.hidden_size):
        raise ConfigError(
            f"the adapted model ({adapted.num_layers} layers x {adapted.hidden_size}) is not "
            f"the shape of {model.name} ({model.num_layers} x {model.hidden_size})"
        )
    texts = list(prompts)
    base = record_activations(model, texts, layers, position, batch_size=batch_size)
    edited = record_activations(adapted, texts, layers, position, batch_size=batch_size)
    directions = {layer: (edited.rows[layer] - base.rows[layer]).mean(0) for layer in base.rows}
    # Below the first block an edit touches, the two models compute the same activations:
    # those layers are left out, since a zero direction cannot be scored, projected or
    # normalised (RMU edits three blocks, so most of its layers would be zero).
    unchanged = [layer for layer, d in directions.items() if not bool(d.any())]
    if len(unchanged) == len(directions):
        raise ConfigError(
            f"the adapted model computes the same activations as {model.name} on these prompts "
            f"at every layer read ({len(unchanged)}): there is no difference to make a vector of"
        )
    directions = {layer: d for layer, d in directions.items() if layer not in unchanged}
    metadata = {
        "model": model.identity(),
        "method": "diff_adapter",
        "read_position": position,
        "normalize": None,
        "diff": {
            "adapted": adapter_name or adapted.name,
            "adapter_method": provenance.get("method"),
            "prompts": len(texts),
            "unchanged_layers": unchanged,
        },
    }
    return SteeringVector(directions, metadata)
