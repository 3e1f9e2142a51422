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
from acteng.pooling import parse_pooling

__all__ = ["GCGResult", "attack_prompt", "gcg_suffix"]


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
    tokens = total / len(detector.layers)
    top = parse_pooling(detector.pooling)
    if not top:
        return tokens.mean(dim=1)
    return tokens.topk(min(top, tokens.shape[1]), dim=1).values.mean(dim=1)


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
    placeholder = "\u2063SUFFIX\u2063"
    layouts = [_layout(model, r, placeholder, target) for r in requests]
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
