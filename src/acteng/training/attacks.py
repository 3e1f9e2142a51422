"""The published attacks on representation training, so every edit ships measured against
them (Lucki et al. 2024, "An Adversarial Perspective on Machine Unlearning for AI Safety";
Arditi & Chughtai 2024, "Unlearning via RMU is mostly shallow"; the WMDP paper's probes).

- `ablate_edit`: project out the direction the edit writes (its model-diff vector at the
  edited layer, `diff_vector`) at that layer and, optionally, every later one. RMU floods
  the stream along one direction; removing it gives back what the edit hid.
- `relearn`: fine-tune every weight on a few texts (unrelated ones or from the domain).
  A shallow edit comes back from a handful of examples.
- `probe_auroc`: can a linear probe still read the domain from the edited model's
  activations? (An edit that hides knowledge from the output may leave it readable.)

Each returns what the caller measures with; `bench/rmu.py` turns them into recovery
fractions (the share of the base-vs-edited gap regained).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

import torch

from acteng.activations import record_activations, right_padded
from acteng.errors import ConfigError
from acteng.evaluation.metrics import auroc
from acteng.methods import fit_logistic
from acteng.models import Model
from acteng.steering.spec import SteeringSpec
from acteng.vectors import SteeringVector

__all__ = ["ablate_edit", "probe_auroc", "relearn"]


def ablate_edit(direction: SteeringVector, layer: int, *, later: bool = False) -> SteeringSpec:
    """Steering that projects the edit's direction at `layer` (its `diff_vector`) out of
    the residual stream at `layer`, and at every layer above it when `later` (up to the
    last layer the vector has)."""
    if layer not in direction.directions:
        raise ConfigError(f"the direction has no layer {layer}; it has {direction.layers}")
    unit = direction[layer] / direction[layer].norm().clamp_min(1e-12)
    top = max(direction.layers) if later else layer
    layers = tuple(range(layer, top + 1))
    vector = SteeringVector({x: unit for x in layers}, dict(direction.metadata))
    return SteeringSpec(vector, coefficient=1.0, layers=layers, mode="ablate")


def relearn(
    model: Model,
    texts: Sequence[str],
    *,
    steps: int = 8,
    lr: float = 3e-5,
    batch_size: int = 5,
    max_tokens: int = 128,
    seed: int = 0,
) -> Model:
    """A copy of `model` fine-tuned (every weight, AdamW, language-modelling loss) on
    `texts` for `steps` batches; `model` itself is unchanged. Defaults: Lucki et al.'s
    budget scaled down (10 texts, 8 steps of 5)."""
    if not texts:
        raise ConfigError("relearn needs at least one text")
    if steps < 1 or batch_size < 1:
        raise ConfigError("steps and batch_size must be >= 1")
    tuned = copy.deepcopy(model.hf)
    tuned.train(False)
    for p in tuned.parameters():
        p.requires_grad_(True)
    encoded = [model.tokenizer(t)["input_ids"][:max_tokens] for t in texts]
    pad = int(model.tokenizer.pad_token_id)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    torch.manual_seed(seed)
    for _ in range(steps):
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        ids, mask = right_padded(batch, pad)
        labels = ids.masked_fill(mask == 0, -100)
        out = tuned(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            labels=labels.to(model.device),
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    for p in tuned.parameters():
        p.requires_grad_(False)
    tuned.eval()
    return Model(tuned, model.tokenizer, layout=model.layout, name=f"{model.name}+relearned")


def probe_auroc(
    model: Model,
    domain_train: Sequence[str],
    other_train: Sequence[str],
    domain_test: Sequence[str],
    other_test: Sequence[str],
    layers: Sequence[int],
    *,
    l2: float = 1.0,
) -> dict[int, float]:
    """Per layer: held-out AUROC of a logistic probe (mean activation of each text) trained
    to tell the domain's texts from others on `model`."""
    if not (domain_train and other_train and domain_test and other_test):
        raise ConfigError("probe_auroc needs train and test texts of both kinds")
    chosen = list(layers)
    train = record_activations(model, [*domain_train, *other_train], chosen, "mean")
    test = record_activations(model, [*domain_test, *other_test], chosen, "mean")
    y = torch.cat([torch.ones(len(domain_train)), torch.zeros(len(other_train))]).double()
    out: dict[int, float] = {}
    for layer in chosen:
        w, b = fit_logistic(train.rows[layer].double(), y, l2=l2, steps=200)
        scores = test.rows[layer].double() @ w + b
        n = len(domain_test)
        out[layer] = auroc(scores[:n], scores[n:])
    return out
