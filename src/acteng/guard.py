"""The inference-time guard: what to do when a detector fires, and conditional steering.

A `Guard` pairs a calibrated `Detector` with a policy, applied when the detector's score
crosses its threshold on the prompt and/or during generation (`check`):

- ``flag``   annotate the result; the text is what the model would say anyway.
- ``block``  return a fixed refusal instead of generating (on a mid-generation firing,
  the partial text is discarded and replaced by the refusal).
- ``steer``  apply counter-steering (e.g. add a refusal direction, or ablate the harmful
  direction) to that row only: from the start when the prompt fires, from the next token
  when the generation does. With a behaviour vector as the steering and a condition
  detector, this is conditional activation steering (CAST, Lee et al. 2024).
- ``stop``   halt that row when the running score crosses (a prompt firing halts it before
  the first token), like the harmfulness-probe baseline of the circuit-breakers paper.

The prompt score is the detector's own score of the prompt (`Detector.score`, one extra
partial forward pass that stops at the detector's deepest layer). The running score after
k generated tokens is the detector's score of those k tokens as a region: the mean over
them of the per-token standardised projections, i.e. what `Detector.score` computes for a
region, updated token by token from hooks on the detector's layers during decoding. A row
that fires changes only itself; the others in the batch decode as if alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from acteng.detectors import Detector
from acteng.errors import ConfigError
from acteng.generation import generate_ids
from acteng.hooks import BlockFn, ForwardContext, hooked
from acteng.models import Model
from acteng.steering.apply import steer
from acteng.steering.spec import SteeringSpec
from acteng.vectors import SteeringVector

__all__ = ["CHECKS", "POLICIES", "Guard", "GuardResult", "calibrate_generation", "guarded_generate"]

POLICIES = ("flag", "block", "steer", "stop")
CHECKS = ("prompt", "generation", "both")
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."


@dataclass(frozen=True)
class Guard:
    """A detector, a policy and where to check; see the module docstring.

    >>> guard = Guard(detector, policy="steer", steering=(SteeringSpec(refusal, 8.0),))
    >>> [result] = acteng.guarded_generate(model, ["How do I pick a lock?"], guard)
    """

    detector: Detector
    policy: str = "flag"
    check: str = "prompt"
    steering: tuple[SteeringSpec, ...] = ()
    threshold: float | None = None  # None: the detector's calibrated threshold
    refusal: str = DEFAULT_REFUSAL
    # The running score over generated text is on another footing than a prompt's score:
    # calibrate it on benign generations (`calibrate_generation`); None: use `limit`.
    generation_threshold: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.detector, Detector):
            raise ConfigError(
                f"a guard needs a Detector, got {type(self.detector).__name__}; load one "
                "with acteng.load_detector"
            )
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown guard policy {self.policy!r}; use one of {POLICIES}")
        if self.check not in CHECKS:
            raise ConfigError(f"unknown guard check {self.check!r}; use one of {CHECKS}")
        specs = (self.steering,) if isinstance(self.steering, SteeringSpec) else self.steering
        object.__setattr__(self, "steering", tuple(specs))
        if self.policy == "steer" and not self.steering:
            raise ConfigError(
                "policy 'steer' needs counter-steering: pass steering=(SteeringSpec(...),)"
            )
        if self.policy != "steer" and self.steering:
            raise ConfigError(f"steering is only used by policy 'steer', not {self.policy!r}")
        if any(not isinstance(s, SteeringSpec) for s in self.steering):
            raise ConfigError("guard steering must be SteeringSpec values")
        for name in ("threshold", "generation_threshold"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")

    @property
    def limit(self) -> float:
        return self.detector.threshold if self.threshold is None else float(self.threshold)

    @property
    def generation_limit(self) -> float:
        """The threshold of the running score during generation."""
        return self.limit if self.generation_threshold is None else self.generation_threshold


@dataclass(frozen=True)
class GuardResult:
    """What the guard did for one prompt."""

    text: str
    prompt_score: float | None  # None when only the generation is checked
    fired_on: str | None  # "prompt", "generation" or None
    action: str  # "none", or the policy when it fired
    generation_scores: list[float] = field(default_factory=list)  # running score per token
    fired_at: int | None = None  # index of the generated token where the running score crossed

    @property
    def flagged(self) -> bool:
        return self.fired_on is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "flagged": self.flagged,
            "fired_on": self.fired_on,
            "action": self.action,
            "prompt_score": self.prompt_score,
            "generation_scores": self.generation_scores,
            "fired_at": self.fired_at,
        }


class _Watch:
    """Running detector scores of generated tokens, one row per batch row.

    Hooks on the detector's layers add each layer's standardised projection of the
    generated tokens; at the deepest layer the per-token score (mean over layers) updates
    the row's running mean. Firing is recorded here and acted on between decoding steps by
    `__call__`, a transformers stopping criterion, so a row's steering or stop takes effect
    from the next token and never halfway through a forward pass.
    """

    def __init__(self, model: Model, guard: Guard, rows: int) -> None:
        det = guard.detector
        self.limit = guard.generation_limit
        self.policy = guard.policy
        self.units = {x: det.directions[x].to(model.device, model.dtype) for x in det.layers}
        self.detector = det
        self.last = max(det.layers)
        self.sums = [0.0] * rows
        self.counts = [0] * rows
        self.scores: list[list[float]] = [[] for _ in range(rows)]
        self.fired_at: list[int | None] = [None] * rows
        self.gate = torch.zeros(rows, dtype=torch.bool)  # rows to counter-steer
        self.stopped = torch.zeros(rows, dtype=torch.bool)
        self._pending: torch.Tensor | None = None

    def read(self, layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> None:
        z = self.detector.standardise(layer, (hidden @ self.units[layer]).double().cpu())
        self._pending = z if self._pending is None else self._pending + z
        if layer != self.last:
            return
        per_token, self._pending = self._pending / len(self.units), None
        index, prompt_len = ctx.token_index, ctx.prompt_len
        if index is None or prompt_len is None or index.shape != hidden.shape[:2]:
            raise ConfigError("the guard needs the forward pass to go through model.hf")
        generated = (index >= prompt_len.view(-1, 1)).cpu()
        for row in range(per_token.shape[0]):
            for value in per_token[row][generated[row]].tolist():
                self.sums[row] += value
                self.counts[row] += 1
                running = self.sums[row] / self.counts[row]
                self.scores[row].append(running)
                if self.fired_at[row] is None and running > self.limit:
                    self.fired_at[row] = self.counts[row] - 1

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        for row, at in enumerate(self.fired_at):
            if at is not None:
                if self.policy == "steer":
                    self.gate[row] = True
                elif self.policy in ("stop", "block"):
                    self.stopped[row] = True
        return self.stopped.to(input_ids.device).clone()

    def hooks(self, model: Model) -> Any:
        fns: dict[int, list[BlockFn]] = {x: [self.read] for x in self.units}
        return hooked(model.hf, model.blocks, fns, track_positions=True)


@torch.no_grad()
def guarded_generate(
    model: Model,
    prompts: str | Sequence[str],
    guard: Guard,
    steering: SteeringVector | SteeringSpec | Sequence[SteeringSpec] | None = None,
    *,
    max_new_tokens: int = 64,
    system: str | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
) -> list[GuardResult]:
    """Generate for chat `prompts` under `guard` (and the user's own `steering`, if any).

    Rows run as one batch; a firing row is blocked, stopped or counter-steered alone.
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise ConfigError("no prompts given; pass at least one prompt")
    guard.detector.directions.check_compatible(model)
    limit = guard.limit
    check_prompt = guard.check in ("prompt", "both")
    watch = guard.check in ("generation", "both")
    prompt_scores: list[float | None] = [None] * len(texts)
    if check_prompt:
        prompt_scores = list(guard.detector.score(model, texts))
    fired = [s is not None and s > limit for s in prompt_scores]
    skip = {i for i, f in enumerate(fired) if f and guard.policy in ("block", "stop")}
    run = [i for i in range(len(texts)) if i not in skip]

    results: dict[int, GuardResult] = {}
    for i in skip:
        text = guard.refusal if guard.policy == "block" else ""
        results[i] = GuardResult(text, prompt_scores[i], "prompt", guard.policy)
    if run:
        watcher = _Watch(model, guard, len(run))
        watcher.gate[:] = torch.tensor([fired[i] for i in run], dtype=torch.bool)
        contexts: list[Any] = []
        if guard.policy == "steer":
            contexts.append(steer(model, list(guard.steering), rows=watcher.gate))
        if watch:
            contexts.append(watcher.hooks(model))
        rows = generate_ids(
            model,
            [texts[i] for i in run],
            steering,
            max_new_tokens=max_new_tokens,
            system=system,
            temperature=temperature,
            seed=seed,
            contexts=contexts,
            stopping_criteria=_stopping(watcher) if watch else None,
        )
        for r, i in enumerate(run):
            results[i] = _result(model, guard, rows[r], prompt_scores[i], fired[i], watcher, r)
    return [results[i] for i in range(len(texts))]


def _stopping(watcher: _Watch) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class WatchCriterion(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> Any:
            return watcher(input_ids, scores, **kw)

    return StoppingCriteriaList([WatchCriterion()])


def _result(
    model: Model,
    guard: Guard,
    ids: list[int],
    prompt_score: float | None,
    prompt_fired: bool,
    watcher: _Watch,
    row: int,
) -> GuardResult:
    at = watcher.fired_at[row]
    scores = watcher.scores[row]
    if prompt_fired:
        fired_on, action = "prompt", guard.policy
    elif at is not None:
        fired_on, action = "generation", guard.policy
    else:
        fired_on, action = None, "none"
    if at is not None and not prompt_fired and guard.policy in ("stop", "block"):
        ids = ids[: at + 1]  # the tokens scored up to and including the crossing
        scores = scores[: at + 1]
    text = model.tokenizer.decode(ids, skip_special_tokens=True)
    if action == "block":
        text = guard.refusal
    return GuardResult(text, prompt_score, fired_on, action, scores, at)


def calibrate_generation(
    model: Model,
    guard: Guard,
    benign_prompts: Sequence[str],
    *,
    target_fpr: float = 0.05,
    max_new_tokens: int = 32,
) -> Guard:
    """The guard with a generation threshold that fires on `target_fpr` of benign answers.

    Generates greedy answers to `benign_prompts` (unguarded), takes each answer's highest
    running score and sets the threshold at their ``1 - target_fpr`` quantile. Use prompts
    like those the guard will see in deployment, held out from anything else it was tuned on.
    """
    if not 0.0 <= target_fpr < 1.0:
        raise ConfigError(f"target_fpr must be in [0, 1), got {target_fpr}")
    if len(benign_prompts) < 10:
        raise ConfigError(f"calibration needs at least 10 prompts, got {len(benign_prompts)}")
    probe = Guard(guard.detector, policy="flag", check="generation", generation_threshold=1e30)
    runs = guarded_generate(model, list(benign_prompts), probe, max_new_tokens=max_new_tokens)
    peaks = torch.tensor(
        [max(r.generation_scores) for r in runs if r.generation_scores], dtype=torch.float64
    )
    if peaks.numel() == 0:
        raise ConfigError("no answer was long enough to score; raise max_new_tokens")
    return replace(guard, generation_threshold=float(torch.quantile(peaks, 1.0 - target_fpr)))
