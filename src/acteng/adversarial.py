"""Adaptive attacks on a guarded model: a greedy coordinate-gradient suffix search (GCG).

`gcg_suffix` searches for one suffix of `length` tokens that, appended to each of a set
of requests (``request + " " + suffix``), makes the model start its answer with `target`
("Sure, here is") and, when a detector is given, keeps that detector's score of the
request below its threshold: the white-box attacker of the threat model, who has the
weights and the detector (Zou et al. 2023; the detector term as in the circuit-breakers
paper's adaptive attacks). Each step takes the gradient of the loss with respect to the
suffix's one-hot tokens, draws `candidates` single-token swaps among each position's
`top_k` most promising tokens, scores them all exactly and keeps the best.

The detector's score is computed inside the same forward pass, differentiably: per token,
the mean over its layers of the standardised projections, pooled as the detector pools
(mean, or the mean of its top k tokens) over the user's text; tests/test_adversarial.py
checks it equals `Detector.score` of the text, so the attack optimises what the guard reads.
What an attack achieved is measured afterwards on the decoded text through the ordinary
paths (`Detector.score`, generation), never on the attacker's own numbers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from acteng.detectors import Detector
from acteng.errors import ConfigError
from acteng.models import Model
from acteng.pooling import pooled

# stands for the suffix while the prompt is rendered (text no user types)
PLACEHOLDER = "\u2063SUFFIX\u2063"

__all__ = ["EmbeddingAttack", "GCGResult", "attack_prompt", "embedding_attack", "gcg_suffix"]


@dataclass(frozen=True)
class GCGResult:
    """The suffix found, and the loss after each step (on the requests it was fit on)."""

    suffix: str
    suffix_ids: list[int]
    losses: list[float] = field(default_factory=list)
    target_losses: list[float] = field(default_factory=list)
    detector_scores: list[float] = field(default_factory=list)  # mean over the requests
    seconds: float = 0.0


def attack_prompt(request: str, suffix: str) -> str:
    """The user message an attack sends: the request, a space, the suffix."""
    return f"{request} {suffix}" if suffix else request


@dataclass
class _Layout:
    """One request's token ids around the suffix: ``before + suffix + after + target``."""

    before: torch.Tensor
    after: torch.Tensor
    target: torch.Tensor
    read_start: int  # first token of the user's text (the detector's "prompt" region)


def _layout(model: Model, request: str, placeholder: str, target: str) -> _Layout:
    tok = model.tokenizer
    rendered = model.render_prompt(attack_prompt(request, placeholder))
    cut = rendered.index(placeholder)
    # the space before the suffix is the suffix's own (its first token is " word")
    head, tail = rendered[: cut - 1], rendered[cut + len(placeholder) :]
    user_start = rendered.rindex(request, 0, cut + 1)

    def ids(text: str) -> torch.Tensor:
        return torch.tensor(tok(text, add_special_tokens=False).input_ids, dtype=torch.long)

    before = ids(head)
    read_start = len(ids(head[:user_start]))
    return _Layout(before, ids(tail), ids(target), read_start)


def _detector_term(
    detector: Detector, hidden: tuple[torch.Tensor, ...], start: int, end: int
) -> torch.Tensor:
    """Per row, the detector's pooled score of tokens [start, end) (differentiable)."""
    total = torch.zeros(hidden[0].shape[0], end - start, dtype=hidden[0].dtype)
    for layer in detector.layers:
        h = hidden[layer + 1][:, start:end]  # the output of block `layer`
        u = detector.directions[layer].to(h.dtype)
        total = total + (h @ u - detector.offsets[layer]) / detector.scales[layer]
    return pooled(total / len(detector.layers), detector.pooling)


def gcg_suffix(
    model: Model,
    requests: Sequence[str],
    *,
    target: str = "Sure, here is",
    detector: Detector | None = None,
    detector_weight: float = 1.0,
    margin: float = 0.5,
    length: int = 20,
    steps: int = 100,
    top_k: int = 64,
    candidates: int = 32,
    seed: int = 0,
    init: str = "!",
    on_step: Callable[[int, GCGResult], None] | None = None,
) -> GCGResult:
    """A universal adversarial suffix for `requests`; see the module docstring.

    The loss is the target's mean cross-entropy, plus ``detector_weight`` times how far the
    detector's score is above ``threshold - margin`` (zero once below), averaged over the
    requests. `on_step` sees the result so far after every step (for progress, or to
    measure success at checkpoints).
    """
    if not requests:
        raise ConfigError("no requests to attack; give at least one")
    if length < 1 or steps < 0 or top_k < 1 or candidates < 1:
        raise ConfigError(
            f"length, top_k and candidates must be >= 1 and steps >= 0, got {length}, "
            f"{top_k}, {candidates}, {steps}"
        )
    if detector is not None:
        detector.directions.check_compatible(model)
        if detector.region != "prompt":
            raise ConfigError(
                f"the attack reads the user's text: the detector's region must be 'prompt', "
                f"got {detector.region!r}"
            )
    tok = model.tokenizer
    hf: Any = model.hf
    embed: Any = hf.get_input_embeddings()
    weight: torch.Tensor = embed.weight.detach()
    vocab = weight.shape[0]
    rng = random.Random(seed)
    start_ids = tok(" " + " ".join([init] * length), add_special_tokens=False).input_ids
    if len(start_ids) != length or not _round_trips(tok, torch.tensor(start_ids)):
        raise ConfigError(f"init {init!r} is not one token per word; use a short word like '!'")
    suffix = torch.tensor(start_ids)
    layouts = [_layout(model, r, PLACEHOLDER, target) for r in requests]
    allowed = _allowed_tokens(model, vocab)
    dtype = next(hf.parameters()).dtype
    with torch.no_grad():  # the embeddings around the suffix never change
        around = [(embed(lay.before), embed(torch.cat([lay.after, lay.target]))) for lay in layouts]
    t0 = time.perf_counter()

    def evaluate(middle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For suffix embeddings `middle` [rows, length, d]: per row the loss, the target's
        cross-entropy and the detector's score, each the mean over the requests."""
        rows = middle.shape[0]
        total, target_loss, scores = torch.zeros(rows), torch.zeros(rows), torch.zeros(rows)
        for lay, (before, tail) in zip(layouts, around, strict=True):
            inputs = torch.cat(
                [before.expand(rows, -1, -1), middle.to(dtype), tail.expand(rows, -1, -1)], dim=1
            )
            out = hf(inputs_embeds=inputs, output_hidden_states=detector is not None)
            t_start = len(lay.before) + length + len(lay.after)
            logits = out.logits[:, t_start - 1 : t_start - 1 + len(lay.target)].float()
            ce = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), lay.target.expand(rows, -1), reduction="none"
            ).mean(dim=1)
            loss = ce
            if detector is not None:
                # the "prompt" region runs from the user's text to the end of the
                # rendered prompt (the template's tail included), as `read_items` reads it
                score = _detector_term(detector, out.hidden_states, lay.read_start, t_start).float()
                loss = loss + detector_weight * torch.relu(score - (detector.threshold - margin))
                scores = scores + score.detach()
            total = total + loss
            target_loss = target_loss + ce.detach()
        n = len(layouts)
        return total / n, target_loss / n, scores / n

    def gradient(ids: torch.Tensor) -> torch.Tensor:
        """d loss / d one-hot suffix tokens, [length, vocab]."""
        one_hot = torch.zeros(1, length, vocab, dtype=weight.dtype)
        one_hot.scatter_(2, ids.view(1, -1, 1), 1.0)
        one_hot.requires_grad_(True)
        with torch.enable_grad():
            evaluate(one_hot @ weight)[0].sum().backward()  # type: ignore[no-untyped-call]
        assert one_hot.grad is not None
        return one_hot.grad[0]

    result = GCGResult(_text(tok, suffix), suffix.tolist())
    losses: list[float] = []
    target_losses: list[float] = []
    detector_scores: list[float] = []
    for step in range(steps):
        grad = gradient(suffix)
        grad[:, ~allowed] = float("inf")
        best_tokens = (-grad).topk(top_k, dim=1).indices  # [length, top_k]
        trial = suffix.repeat(candidates, 1)
        for row in range(candidates):
            position = rng.randrange(length)
            trial[row, position] = best_tokens[position, rng.randrange(top_k)]
        trial = trial[[_round_trips(tok, t) for t in trial]]
        if trial.shape[0] == 0:
            continue
        with torch.no_grad():
            loss, target_loss, score = evaluate(embed(trial))
        pick = int(loss.argmin())
        suffix = trial[pick].clone()
        losses.append(float(loss[pick]))
        target_losses.append(float(target_loss[pick]))
        detector_scores.append(float(score[pick]))
        result = GCGResult(
            _text(tok, suffix),
            suffix.tolist(),
            list(losses),
            list(target_losses),
            list(detector_scores),
            time.perf_counter() - t0,
        )
        if on_step is not None:
            on_step(step + 1, result)
    return result


def _allowed_tokens(model: Model, vocab: int) -> torch.Tensor:
    """Printable, non-special tokens: what a user can type."""
    tok = model.tokenizer
    special = set(tok.all_special_ids)
    allowed = torch.zeros(vocab, dtype=torch.bool)
    for i in range(min(vocab, len(tok))):
        if i in special:
            continue
        text = tok.decode([i])
        allowed[i] = bool(text.strip()) and text.isprintable() and text.isascii()
    return allowed


def _text(tok: Any, ids: torch.Tensor) -> str:
    """The suffix as the user types it after the request's space."""
    return str(tok.decode(ids)).removeprefix(" ")


def _round_trips(tok: Any, ids: torch.Tensor) -> bool:
    """The suffix's text, after the request and a space, encodes back to the same tokens
    (so what the attack found is what a user can send)."""
    text = str(tok.decode(ids))
    if not text.startswith(" "):
        return False
    return bool(tok(text, add_special_tokens=False).input_ids == ids.tolist())


@dataclass(frozen=True)
class EmbeddingAttack:
    """What `embedding_attack` found for one request: the answer the model gives with the
    optimised embeddings in place of the suffix, and the target's loss at each step."""

    answer: str
    losses: list[float]
    seconds: float


def embedding_attack(
    model: Model,
    request: str,
    target: str,
    *,
    length: int = 20,
    steps: int = 50,
    step_size: float = 0.1,
    max_new_tokens: int = 32,
    init: str = "!",
) -> EmbeddingAttack:
    """The input-embedding attack (Schwinn et al. 2024, the attack that undid circuit
    breakers): `length` continuous vectors take the suffix's place, and signed gradient
    descent on them lowers the cross-entropy of `target` as the answer's start. No
    tokenizer constrains them, so this bounds what any prompt attack can do; it needs the
    weights, as every white-box attack does. Each step moves every coordinate by
    `step_size` times the embedding table's mean absolute value. Returns the greedy
    answer the model then writes.
    """
    if length < 1 or steps < 0 or max_new_tokens < 1:
        raise ConfigError("length and max_new_tokens must be >= 1, steps >= 0")
    if not target:
        raise ConfigError("the attack needs a target text for the answer to start with")
    hf: Any = model.hf  # transformers' methods are untyped
    tok = model.tokenizer
    embed = hf.get_input_embeddings()
    lay = _layout(model, request, PLACEHOLDER, target)
    start_ids = tok(" " + " ".join([init] * length), add_special_tokens=False).input_ids
    started = time.perf_counter()
    with torch.no_grad():
        before, after, goal = (embed(x[None]) for x in (lay.before, lay.after, lay.target))
        suffix = embed(torch.tensor(start_ids)[None]).clone()
        step = step_size * float(embed.weight.abs().mean())
    t_start = before.shape[1] + suffix.shape[1] + after.shape[1]
    losses: list[float] = []
    for _ in range(steps):
        suffix.requires_grad_(True)
        with torch.enable_grad():
            inputs = torch.cat([before, suffix, after, goal], dim=1)
            logits = hf(inputs_embeds=inputs).logits[0, t_start - 1 : t_start - 1 + goal.shape[1]]
            loss = torch.nn.functional.cross_entropy(logits.float(), lay.target)
            (grad,) = torch.autograd.grad(loss, suffix)
        losses.append(loss.item())
        with torch.no_grad():
            suffix = (suffix - step * grad.sign()).detach()
    with torch.no_grad():
        prompt = torch.cat([before, suffix, after], dim=1)
        new = hf.generate(
            inputs_embeds=prompt,
            attention_mask=torch.ones(prompt.shape[:2], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    answer = tok.decode(new[0], skip_special_tokens=True)
    return EmbeddingAttack(answer, losses, time.perf_counter() - started)
