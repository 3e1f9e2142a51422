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

The policy itself is `GuardState`, one per row, fed scores and answering go / steer /
stop; the server's rows (`acteng.server.rows`) run the same class, and the per-token
scores come from the same `acteng.monitoring.Readout`, so a library run and a served
request reach the same verdict at the same token (tests/server/test_guard_parity.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from acteng.detectors import Detector
from acteng.errors import ConfigError
from acteng.generation import eos_ids, generate_ids
from acteng.hooks import ForwardContext, hooked
from acteng.models import Model
from acteng.monitoring import LayerMeans, Readout
from acteng.steering.apply import steer
from acteng.steering.spec import SteeringSpec
from acteng.vectors import SteeringVector

__all__ = [
    "CHECKS",
    "POLICIES",
    "Guard",
    "GuardResult",
    "GuardState",
    "Verdict",
    "calibrate_generation",
    "guarded_generate",
]

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


Verdict = Literal["go", "steer", "stop"]


class GuardState:
    """The guard's policy for one row, one event at a time (no model, no tensors).

    The caller scores (the prompt with `Detector.score`, each generated token with the
    detector's `Readout`) and acts on the verdict: "steer" turns the row's counter-steering
    on from its next forward pass, "stop" ends the row (before its first token when the
    prompt fired). `guarded_generate` and the server's rows both run this one policy.

    >>> state = GuardState(guard)
    >>> state.on_prompt(0.3), state.on_token(1.7)   # ("go", "stop") for a "stop" guard
    >>> state.result(text)
    """

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.prompt_score: float | None = None  # None until `on_prompt`
        self.fired_on: str | None = None  # "prompt" or "generation"
        self.fired_at: int | None = None  # generated token where the running score crossed
        self.scores: list[float] = []  # the running score after each generated token
        self.steering = False  # counter-steering is on
        self.stopped = False
        self._sum = 0.0

    @property
    def checks_prompt(self) -> bool:
        return self.guard.check in ("prompt", "both")

    @property
    def watches(self) -> bool:
        """Whether the generated tokens are scored (`on_token`)."""
        return self.guard.check in ("generation", "both")

    def on_prompt(self, score: float) -> Verdict:
        """The detector's score of the prompt."""
        self.prompt_score = float(score)
        if not score > self.guard.limit:
            return "go"
        self.fired_on = "prompt"
        return self._fire()

    def on_token(self, score: float) -> Verdict:
        """The detector's score of the next generated token (the mean over its layers of
        the standardised projections); the running score is the mean of these so far."""
        if self.stopped:
            return "stop"
        self._sum += score
        self.scores.append(self._sum / (len(self.scores) + 1))
        if self.fired_at is not None or not self.scores[-1] > self.guard.generation_limit:
            return "go"
        self.fired_at = len(self.scores) - 1
        if self.fired_on is None:
            self.fired_on = "generation"
        return self._fire()

    def _fire(self) -> Verdict:
        policy = self.guard.policy
        if policy == "steer" and not self.steering:
            self.steering = True
            return "steer"
        if policy in ("block", "stop"):
            self.stopped = True
            return "stop"
        return "go"

    @property
    def action(self) -> str:
        return self.guard.policy if self.fired_on is not None else "none"

    def kept(self, generated: int) -> int:
        """How many of the row's `generated` tokens its text keeps: when the running score
        stopped it, those up to and including the crossing; none when the prompt did."""
        if not self.stopped:
            return generated
        return 0 if self.fired_at is None else min(generated, self.fired_at + 1)

    def result(self, text: str) -> GuardResult:
        """The row's outcome, given the text it generated (cut to `kept` tokens)."""
        if self.action == "block":
            text = self.guard.refusal
        scores = list(self.scores)
        return GuardResult(
            text, self.prompt_score, self.fired_on, self.action, scores, self.fired_at
        )


class _Watch:
    """Feeds each row's generated tokens to its `GuardState` during ``generate``.

    Hooks on the detector's layers read every token (`LayerMeans`); at the deepest layer
    the generated tokens' scores go to their rows' states. Verdicts are acted on between
    decoding steps by `__call__`, a transformers stopping criterion, so a row's steering or
    stop takes effect from the next token and never halfway through a forward pass. A row
    that sampled an end-of-sequence token is scored no further (its padding is not text),
    as in the server, where such a row leaves the batch.
    """

    def __init__(self, model: Model, states: list[GuardState]) -> None:
        detector = states[0].guard.detector
        self.states = states
        self.means = LayerMeans({"guard": Readout.of(model, detector)})
        self.last = max(detector.layers)
        self.eos = eos_ids(model)
        self.gate = torch.tensor([s.steering for s in states], dtype=torch.bool)
        self.stopped = torch.zeros(len(states), dtype=torch.bool)
        self.ended = [False] * len(states)
        self.verdicts: list[Verdict] = ["go"] * len(states)  # to act on after this step

    def update(self, layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> None:
        index, prompt_len = ctx.token_index, ctx.prompt_len
        if index is None or prompt_len is None or index.shape != hidden.shape[:2]:
            raise ConfigError("the guard needs the forward pass to go through model.hf")
        per_token = self.means.scores()["guard"]  # [batch, q]
        generated = (index >= prompt_len.view(-1, 1)).cpu()
        for row, state in enumerate(self.states):
            if self.ended[row]:
                continue
            for value in per_token[row][generated[row]].tolist():
                verdict = state.on_token(value)
                if verdict != "go":
                    self.verdicts[row] = verdict

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        for row, verdict in enumerate(self.verdicts):
            if verdict == "steer":
                self.gate[row] = True
            elif verdict == "stop":
                self.stopped[row] = True
        self.verdicts = ["go"] * len(self.states)
        for row, token in enumerate(input_ids[:, -1].tolist()):
            self.ended[row] = self.ended[row] or token in self.eos
        return self.stopped.to(input_ids.device).clone()

    def hooks(self, model: Model) -> Any:
        fns = self.means.block_fns()
        fns[self.last].append(self.update)
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
    states = [GuardState(guard) for _ in texts]
    if states[0].checks_prompt:
        for state, score in zip(states, guard.detector.score(model, texts), strict=True):
            state.on_prompt(score)
    run = [i for i, state in enumerate(states) if not state.stopped]
    answers = [""] * len(texts)
    if run:
        watcher = _Watch(model, [states[i] for i in run])
        contexts: list[Any] = []
        if guard.policy == "steer":
            contexts.append(steer(model, list(guard.steering), rows=watcher.gate))
        if states[0].watches:
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
            stopping_criteria=_stopping(watcher) if states[0].watches else None,
        )
        for ids, i in zip(rows, run, strict=True):
            kept = ids[: states[i].kept(len(ids))]
            answers[i] = model.tokenizer.decode(kept, skip_special_tokens=True)
    return [state.result(text) for state, text in zip(states, answers, strict=True)]


def _stopping(watcher: _Watch) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class WatchCriterion(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> Any:
            return watcher(input_ids, scores, **kw)

    return StoppingCriteriaList([WatchCriterion()])


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
