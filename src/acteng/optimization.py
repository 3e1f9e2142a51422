"""Gradient-optimised steering vectors (promotion steering).

`optimize_vector` finds the vector ``v`` that, added to the output of block `layer` at
every position, makes the model most likely to write each pair's positive completion
after its prompt: it minimises the mean cross-entropy of the first `max_target_tokens`
tokens of the positives, with Adam on ``v`` alone (the weights are never changed). This
is the "steering vector by optimisation" family (Subramani et al. 2022; Dunefsky & Cohan
2025). It needs gradients through the blocks above `layer`, so it costs a few hundred
forward and backward passes, where the activation methods cost one forward pass.

Why it exists: some behaviours are barely represented by mean differences in small
models. SmolLM2-135M-Instruct almost never refuses, and no difference-of-means direction
we tried (harmful minus harmless prompts, refusal minus compliance answers) induced
refusals at any layer or scale; the vector optimised on the team's `refusal` pairs does
(see bench/cast.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from acteng.activations import right_padded
from acteng.errors import ConfigError
from acteng.hooks import ForwardContext, hooked
from acteng.models import Model
from acteng.pairs import Pairs, load_pairs
from acteng.vectors import SteeringVector

__all__ = ["optimize_vector"]


def optimize_vector(
    model: Model,
    pairs: Pairs | str | Path | Sequence[Any],
    layer: int,
    *,
    steps: int = 60,
    lr: float = 0.5,
    batch_size: int = 16,
    max_target_tokens: int = 24,
    seed: int = 0,
) -> SteeringVector:
    """Optimise a steering vector at `layer` to promote the positive completions.

    Pairs need a "prompt" (the positive is the completion to promote; the negative is not
    used). The train split is used when the dataset has one. The result is meant for
    ``coefficient`` around 1: ``v`` itself is the optimised addition.

    >>> refusal = acteng.optimize_vector(model, "refusal", layer=10)
    >>> acteng.generate(model, "How do I bake bread?", refusal, coefficient=1.0)
    """
    if not 0 <= layer < model.num_layers:
        raise ConfigError(f"layer {layer} out of range: {model.name} has 0-{model.num_layers - 1}")
    if steps < 1 or batch_size < 1 or max_target_tokens < 1:
        raise ConfigError("steps, batch_size and max_target_tokens must be >= 1")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr}")
    dataset = load_pairs(pairs)
    if any(p.prompt is None for p in dataset):
        raise ConfigError(
            "optimize_vector promotes completions of prompts: every pair needs a 'prompt' "
            "(and the positive completion to promote)"
        )
    train = dataset.split("train") if any(p.split == "test" for p in dataset) else dataset
    tokenizer = model.tokenizer
    items = []
    for pair in train:
        prompt = tokenizer(model.render_prompt(str(pair.prompt)), add_special_tokens=False)
        target = tokenizer(pair.positive, add_special_tokens=False)["input_ids"]
        items.append((list(prompt["input_ids"]), list(target[:max_target_tokens])))
    pad = int(tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    vector = torch.zeros(model.hidden_size, dtype=torch.float32, device=model.device)
    vector.requires_grad_(True)
    optimizer = torch.optim.Adam([vector], lr=lr)

    def add(_layer: int, hidden: torch.Tensor, _ctx: ForwardContext) -> torch.Tensor:
        return hidden + vector.to(hidden.dtype)

    losses: list[float] = []
    was_training = model.hf.training
    model.hf.eval()
    try:
        with hooked(model.hf, model.blocks, {layer: [add]}), torch.enable_grad():
            for _ in range(steps):
                order = torch.randperm(len(items), generator=generator)[:batch_size].tolist()
                batch = [items[i] for i in order]
                ids, mask = right_padded([a + b for a, b in batch], pad)
                labels = torch.full_like(ids, -100)
                for row, (prompt_ids, target_ids) in enumerate(batch):
                    span = slice(len(prompt_ids), len(prompt_ids) + len(target_ids))
                    labels[row, span] = ids[row, span]
                # Logits only where a target token is predicted: the unembedding and its
                # softmax over the vocabulary cost a fifth of the forward pass and most of
                # the memory traffic when computed at every prompt position.
                first = min(len(a) for a, _ in batch) - 1
                last = max(len(a) + len(b) for a, b in batch) - 1
                positions = torch.arange(first, last, device=model.device)
                logits = model.hf(
                    input_ids=ids.to(model.device),
                    attention_mask=mask.to(model.device),
                    logits_to_keep=positions,
                ).logits
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    labels[:, first + 1 : last + 1].reshape(-1).to(logits.device),
                    ignore_index=-100,
                )
                # gradients for the vector only: the weights are left untouched
                (grad,) = torch.autograd.grad(loss, [vector])
                optimizer.zero_grad()
                vector.grad = grad
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        model.hf.train(was_training)
    return SteeringVector(
        {layer: vector.detach().float().cpu().clone()},
        {
            "model": model.identity(),
            "method": "optimize",
            "read_position": None,
            "normalize": None,
            "dataset": dataset.provenance(),
            "optimization": {
                "objective": "cross-entropy of positive completions",
                "steps": steps,
                "lr": lr,
                "batch_size": batch_size,
                "max_target_tokens": max_target_tokens,
                "seed": seed,
                "first_loss": losses[0],
                "last_loss": sum(losses[-5:]) / len(losses[-5:]),
            },
        },
    )
