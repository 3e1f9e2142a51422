"""Circuit breakers: representation rerouting (Zou et al. 2024, arXiv 2406.04313).

The published method. A LoRA adapter on every Linear layer of the blocks up to the highest
target layer is trained with two losses on the residual stream:

- **rerouting**, on harmful requests followed by the model's own compliant answers:
  ``ReLU(cos(h_adapted, h_frozen))`` at the target layers, over request and answer
  tokens: the adapted model's representation of harmful content is turned away from what
  its later blocks know how to use, so generation breaks down instead of complying;
- **retain**, on harmless look-alikes with their own answers and on refusals: L2 distance
  of adapted from frozen representations at every layer up to the highest target;
- the published schedule: ``c_reroute = alpha·(1 − t/2T)``, ``c_retain = alpha·t/2T``
  (times ``retain_weight``, which balances the relative distance below against the
  cosine: 10 broke most harmful requests, 30 almost none; the README has the figures).

The frozen representations come from the same model with the adapter disabled, so there
is no second copy of the weights. The forward stops after the highest target block.

What changes on small fp32 models, where the 8B recipe does nothing (measured on
SmolLM2-135M, ../shared/design/representation-training.md):

- **centred cosine**: every token shares a large common component (cosine ~0.75 with the
  mean activation), so the cosine is taken after subtracting the retain mean ``mu`` of
  each target layer; otherwise the loss is saturated by what all tokens share;
- **LoRA B starts small, not at zero**: with B = 0 the adapted and frozen
  representations are equal and cos = 1 is a stationary point of the rerouting loss (its
  gradient is exactly zero); the 8B runs escape through bf16 rounding, fp32 never does.
  Even from a small start, lr 1e-3 left the loss at 1.0 for 48 steps: the default is 3e-3;
- **the retain distance is relative**: divided by each layer's median centred norm, so
  one alpha serves layers whose norms differ 5-fold and models of any width;
- **the shared template prefix is not rerouted** (the chat template and default system
  prompt open every conversation identically, so harmful and harmless requests would
  pull the same tokens both ways), nor is any token a harmful conversation shares with a
  retained one (`conversations.reroute_starts`); the prefix and a plain text's first
  token (the attention sinks) are *held* by the retain loss instead, relative to their
  own norm: left free, they were rerouting's cheapest lever and drifted by ~99 %;
- **plain text is retained too** (neutral paragraphs, general-knowledge answers): with
  chat requests alone, neutral-text perplexity rose ~30 %; with them, ~3 %.

**Paired batches** (the default on the bundled sets, which are minimal pairs): each step
holds its harmful rows' look-alikes in a retain term of their own, so rerouting is pushed
to what separates the two; half of the rest of the retain batch is plain text.

Target layers default to 30 % and 60 % of the depth (the paper's 10 and 20 of Llama-3-8B's
32, in acteng's numbering 9 and 19). The result is a PEFT adapter folder with acteng's
provenance; the model passed in is left as it was.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acteng.errors import ConfigError, DataError, missing_extra
from acteng.layer_selection import parse_layers
from acteng.models import Model, quiet_peft
from acteng.training import losses as losses_on
from acteng.training.adapters import PROVENANCE_FILE, check_base_model, staged_folder, texts_hash
from acteng.training.conversations import (
    Conversations,
    as_messages,
    at_most,
    encode,
    model_answers,
    paired_sample,
    reroute_starts,
    shared_prefix,
)
from acteng.training.data import Messages, circuit_breaker_sets, default_retain_texts
from acteng.training.loop import OnStep, TrainLog, check_positive, run_steps
from acteng.training.reading import BlockReader

__all__ = [
    "CircuitBreakerResult",
    "default_circuit_breaker_layers",
    "model_answers",
    "train_circuit_breaker",
]

logger = logging.getLogger(__name__)


def default_circuit_breaker_layers(model: Model) -> tuple[int, int]:
    """30 % and 60 % of the way up the blocks (9 and 18 of SmolLM2's 30; the paper's
    targets are 9 and 19 of Llama-3-8B's 32 in acteng's numbering)."""
    n = model.num_layers
    low = max(1, round(0.3 * n))
    return low, max(low + 1, min(n - 1, round(0.6 * n)))


@dataclass
class CircuitBreakerResult:
    """Where the adapter is and what training did; `provenance` is what the folder's
    ``acteng_training.json`` holds."""

    adapter: Path
    target_layers: tuple[int, ...]
    steps: int
    losses: list[dict[str, float]] = field(repr=False)
    provenance: dict[str, Any] = field(repr=False)

    @property
    def rerouted(self) -> bool:
        """Whether rerouting took hold: the rerouting loss (1 = harmful representations
        untouched) averaged over the last tenth of the steps is below 0.9 (about 0.57 in full
        runs on the default model; a run too short for the schedule ends at 1.0)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(row["reroute"] for row in tail) / len(tail) < 0.9


def train_circuit_breaker(
    model: Model,
    out: str | os.PathLike[str],
    *,
    harmful: Conversations | None = None,
    retain: Conversations | None = None,
    refusals: Sequence[Messages] | None = None,
    retain_texts: Sequence[str] | None = None,
    target_layers: int | str | Sequence[int] | None = None,
    steps: int = 150,
    lr: float = 3e-3,
    alpha: float = 10.0,
    retain_weight: float = 10.0,
    rank: int = 16,
    init_scale: float = 1e-3,
    batch_size: int = 4,
    answer_tokens: int = 32,
    max_tokens: int = 128,
    examples: int = 256,
    text_share: float | None = None,
    answer_only_share: float = 0.0,
    paired: bool | None = None,
    seed: int = 0,
    checkpoint_every: int = 50,
    on_step: OnStep | None = None,
    progress: bool = False,
) -> CircuitBreakerResult:
    """Train a circuit-breaker LoRA adapter and save it at `out` (every
    `checkpoint_every` steps and at the end).

    `harmful` (requests to break on) and `retain` (harmless requests to keep answering)
    are strings or chat-message lists; each gets the model's own greedy answer
    (`model_answers`, `answer_tokens` long). `refusals` are whole conversations ending in
    an assistant refusal, kept as they are. By default all three come from the team's
    train splits (`acteng.training.data.circuit_breaker_sets`); at most `examples` of
    each set are used (seeded sample), which bounds the answer generation.
    `retain_texts`: plain text held too (default: `default_retain_texts`; ``[]``: none).
    `text_share` is the share of each retain batch drawn from those texts (default
    ``None``: half when paired, else in proportion to the sets' sizes, so more `examples`
    means less plain text per step). `answer_only_share` is the share of harmful examples
    trained on their answer alone, the request dropped (an empty user turn), as the paper's
    Llama-3 recipe does for half: the breaker must fire on harmful content, not the request.
    `paired` says the i-th harmful and the i-th retain request are a minimal pair; each
    step then holds its harmful rows' look-alikes in a retain term of their own. Default
    ``None``: paired when both sets are the bundled ones (minimal pairs by construction),
    unpaired when you give either.

    Ctrl-C saves the adapter of the last finished step and re-raises; a non-finite or
    diverging loss raises `TrainingError` with the last good adapter kept (`run_steps`).
    A run whose rerouting never took hold (`CircuitBreakerResult.rerouted` false) logs a
    warning.

    >>> result = acteng.training.train_circuit_breaker(model, "cb")
    >>> guarded = acteng.load_model(adapter=result.adapter)
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise missing_extra("peft", "peft", purpose="training a circuit breaker") from None
    check_base_model(model, "a circuit breaker")
    targets: tuple[int, ...] = default_circuit_breaker_layers(model)
    if target_layers is not None:  # any selection `parse_layers` reads: [9, 18], "8-10", -1
        targets = tuple(parse_layers(model, target_layers))
    check_positive(lr=lr, alpha=alpha, retain_weight=retain_weight, init_scale=init_scale)
    if not 0.0 <= answer_only_share <= 1.0:
        raise ConfigError(f"answer_only_share must be in [0, 1], got {answer_only_share}")
    if text_share is not None and not 0.0 <= text_share <= 1.0:
        raise ConfigError(f"text_share must be in [0, 1] (or None), got {text_share}")
    if text_share and round(batch_size * text_share) == 0:
        raise ConfigError(
            f"text_share {text_share} of a batch of {batch_size} is no text at all; raise "
            "batch_size or text_share"
        )
    if min(steps, batch_size, rank, checkpoint_every, examples) < 1 or answer_tokens < 1:
        raise ConfigError(
            "steps, batch_size, rank, checkpoint_every, examples and answer_tokens must be >= 1"
        )
    bundled = circuit_breaker_sets("train")
    rng = random.Random(seed)
    paired = (harmful is None and retain is None) if paired is None else paired

    harmful_msgs, retain_msgs, partner = paired_sample(
        bundled["harmful"] if harmful is None else as_messages(harmful, "harmful"),
        bundled["harmless"] if retain is None else as_messages(retain, "retain"),
        examples,
        rng,
        paired=paired,
    )
    refusal_msgs = at_most(
        bundled["refusal"] if refusals is None else [list(r) for r in refusals], examples, rng
    )
    if min(len(harmful_msgs), len(retain_msgs)) < 2:
        raise DataError("circuit breakers need at least 2 harmful and 2 retain requests")
    keys = {json.dumps(m, sort_keys=True) for m in harmful_msgs}
    shared = [m for m in retain_msgs if json.dumps(m, sort_keys=True) in keys]
    if shared:
        raise DataError(
            f"{len(shared)} requests are in both the harmful and the retain set (e.g. "
            f"{shared[0][-1]['content'][:60]!r}); a request cannot be broken and kept"
        )
    bad_refusals = [i for i, r in enumerate(refusal_msgs) if r[-1].get("role") != "assistant"]
    if bad_refusals:
        raise DataError(f"refusals {bad_refusals[:5]} do not end with an assistant turn")

    plain = default_retain_texts() if retain_texts is None else [str(t) for t in retain_texts]
    text_ids = [list(model.tokenizer(t)["input_ids"])[:max_tokens] for t in plain if t.strip()]
    # a plain text of one token has nothing to hold (its only token is the attention sink)
    text_ids = [ids for ids in text_ids if len(ids) > 1]
    if text_share and not text_ids:
        raise DataError(
            f"text_share {text_share} asks for plain retain texts; give retain_texts of more "
            "than one token"
        )
    if text_share is None and paired and text_ids and batch_size > 1:
        text_share = 0.5  # measured with pairs: fewer harmless breaks, less perplexity
    harmful_answers, retain_answers = [
        model_answers(model, msgs, max_new_tokens=answer_tokens, progress=progress and label)
        for msgs, label in ((harmful_msgs, "harmful answers"), (retain_msgs, "retain answers"))
    ]
    # its own generator, so that a share of 0 leaves every other draw as it was
    n_bare = round(answer_only_share * len(harmful_msgs))
    bare = set(random.Random(seed + 1).sample(range(len(harmful_msgs)), n_bare))
    no_request: Messages = [{"role": "user", "content": ""}]
    asked = [no_request if i in bare else m for i, m in enumerate(harmful_msgs)]
    harmful_ids = encode(model, asked, harmful_answers, max_tokens, "harmful")
    chat_ids = encode(model, retain_msgs, retain_answers, max_tokens, "retain") + encode(
        model, refusal_msgs, [None] * len(refusal_msgs), max_tokens
    )
    prefix = shared_prefix(harmful_ids + chat_ids)
    reroute_from = reroute_starts(harmful_ids, chat_ids, prefix)
    answer_start = len(model.chat_ids(no_request))
    for i in bare:  # an answer alone is rerouted from its first token
        reroute_from[i] = min(max(reroute_from[i], answer_start), len(harmful_ids[i]) - 1)
    retain_ids = chat_ids + text_ids
    # a plain text's first token (the attention sink) is held relative to its own norm
    retain_from = [prefix] * len(chat_ids) + [1] * (len(retain_ids) - len(chat_ids))
    top = targets[-1]
    reader = BlockReader(model, list(range(top + 1)))  # every layer up to the top is held

    torch.manual_seed(seed)
    was_training = model.hf.training
    model.hf.eval()
    flags = {name: p.requires_grad for name, p in model.hf.named_parameters()}

    # the frozen model's centre and spread at each layer, over retain tokens
    mu, scale = reader.centre_and_spread(chat_ids[:64], prefix)

    linear_paths = sorted(
        f"{model.layout.blocks}.{b}.{name}"
        for b in range(top + 1)
        for name, module in model.blocks[b].named_modules()
        if isinstance(module, nn.Linear)
    )
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=linear_paths,
        bias="none",
        task_type="CAUSAL_LM",
    )
    hyper = {
        "target_layers": list(targets),
        "retain_layers": [0, top],
        "steps": steps,
        "lr": lr,
        "alpha": alpha,
        "retain_weight": retain_weight,
        "rank": rank,
        "init_scale": init_scale,
        "batch_size": batch_size,
        "answer_tokens": answer_tokens,
        "max_tokens": max_tokens,
        "examples": examples,
        **({"text_share": text_share} if text_share is not None else {}),
        **({"answer_only_share": answer_only_share} if answer_only_share else {}),
        "paired": paired,
        "shared_prefix_tokens": prefix,
        "seed": seed,
        "schedule": "c_reroute = alpha (1 - t/2T), c_retain = retain_weight alpha t/2T",
        "rerouted_tokens": sum(len(ids) for ids in harmful_ids) - sum(reroute_from),
    }
    provenance: dict[str, Any] = {
        "method": "circuit_breaker",
        "reference": (
            "Zou et al. 2024, Improving Alignment and Robustness with Circuit Breakers "
            "(arXiv 2406.04313); centred cosine, non-zero LoRA-B start, sinks held"
        ),
        "data": {
            name: {"conversations": len(msgs), "hash": texts_hash([json.dumps(m) for m in msgs])}
            for name, msgs in (
                ("harmful", harmful_msgs),
                ("retain", retain_msgs),
                ("refusal", refusal_msgs),
            )
        }
        | {"retain_texts": {"texts": len(plain), "hash": texts_hash(plain)}},
        "answers": {"harmful": texts_hash(harmful_answers), "retain": texts_hash(retain_answers)},
        "hyperparameters": hyper,
    }
    log = TrainLog()
    with quiet_peft():
        peft_model = get_peft_model(model.hf, config)  # injects LoRA layers into model.hf

    def save(done: int, interrupted: bool = False) -> Path:
        record = {
            **provenance,
            "model": model.identity(),
            "training": log.record(done, interrupted),
        }
        target = Path(out)
        with staged_folder(target) as staging:
            peft_model.save_pretrained(str(staging))
            (staging / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return target

    def retain_rows() -> list[int]:
        if text_share is None:
            return rng.sample(range(len(retain_ids)), min(batch_size, len(retain_ids)))
        texts = range(len(chat_ids), len(retain_ids))
        n_text = min(round(batch_size * text_share), len(texts))
        n_chat = min(batch_size - n_text, len(chat_ids))
        return rng.sample(range(len(chat_ids)), n_chat) + rng.sample(texts, n_text)

    def step_losses(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        share = step / (2 * steps)  # the paper's schedule
        c_reroute, c_retain = alpha * (1 - share), alpha * share * retain_weight
        h_rows = rng.sample(range(len(harmful_ids)), min(batch_size, len(harmful_ids)))
        # each harmful row's look-alike is held in the same step, in a term of its own
        alike = [p for p in (partner[i] for i in h_rows) if p is not None]
        r_rows = alike + retain_rows()
        h_batch, h_starts = [harmful_ids[i] for i in h_rows], [reroute_from[i] for i in h_rows]
        r_batch, r_starts = [retain_ids[i] for i in r_rows], [retain_from[i] for i in r_rows]
        with torch.no_grad(), peft_model.disable_adapter():
            h_frozen, h_used = reader(h_batch, h_starts)
            r_frozen, r_used = reader(r_batch, r_starts)
        h_now, _ = reader(h_batch, h_starts)
        r_now, _ = reader(r_batch, r_starts)
        reroute = losses_on.reroute_loss(h_now, h_frozen, h_used, mu, targets)
        held = reader.before_start(r_batch, r_starts)
        retain = losses_on.retain_loss(r_now, r_frozen, r_used, scale, held, len(alike))
        return c_reroute * reroute + c_retain * retain, {"reroute": reroute, "retain": retain}

    try:
        generator = torch.Generator().manual_seed(seed)
        trainable = []
        for name, p in peft_model.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_B" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * init_scale)
            if "lora_" in name:
                trainable.append(p)
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        run_steps(
            "circuit breaker",
            steps,
            optimizer,
            step_losses,
            save,
            log,
            advice=f"lower lr ({lr:g})",
            checkpoint_every=checkpoint_every,
            on_step=on_step,
            progress=progress,
        )
    finally:
        peft_model.unload()  # the caller's model gets its own Linear layers back
        for name, p in model.hf.named_parameters():
            p.requires_grad_(flags.get(name, False))
            p.grad = None
        model.hf.train(was_training)
    assert log.last_good is not None
    result = CircuitBreakerResult(log.last_good, targets, log.done, log.losses, provenance)
    if not result.rerouted:  # an adapter that changes nothing must not pass for a defence
        logger.warning(
            f"rerouting never took hold (loss {log.losses[-1]['reroute']:.4f} at the end, 1 = "
            f"untouched): this adapter barely changes the model; train for more steps (--steps;"
            f" {log.done} are too few for the schedule) or with a higher lr (--lr, {lr:g})"
        )
    return result
