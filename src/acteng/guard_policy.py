"""The guard's policy, apart from any model: what to do when a detector fires.

`Guard` is a detector (or several), a policy (flag / block / steer / stop) and where to
check; `GuardState` runs that policy for one row, one event at a time (the prompt's score,
then each generated token's), and `GuardResult` is its outcome. `acteng.guard` runs it on
the model (`guarded_generate`); the server's rows run the same class. See `acteng.guard`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from acteng.detectors import Detector
from acteng.errors import ConfigError
from acteng.steering.spec import SteeringSpec

__all__ = ["CHECKS", "DEFAULT_REFUSAL", "POLICIES", "Guard", "GuardResult", "GuardState", "Verdict"]

POLICIES = ("flag", "block", "steer", "stop")
CHECKS = ("prompt", "generation", "both")
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."


@dataclass(frozen=True)
class Guard:
    """A detector, a policy and where to check; see the module docstring.

    >>> guard = Guard(detector, policy="steer", steering=(SteeringSpec(refusal, 8.0),))
    >>> [result] = acteng.guarded_generate(model, ["How do I pick a lock?"], guard)
    """

    detector: Detector | tuple[Detector, ...]  # several: any of them firing fires the guard
    policy: str = "flag"
    check: str = "prompt"
    steering: tuple[SteeringSpec, ...] = ()
    threshold: float | None = None  # None: the detector's calibrated threshold
    refusal: str = DEFAULT_REFUSAL
    # The running score over generated text is on another footing than a prompt's score:
    # calibrate it on benign generations (`calibrate_generation`); None: use `limit`.
    generation_threshold: float | None = None

    def __post_init__(self) -> None:
        found = self.detector
        detectors = tuple(found) if isinstance(found, (list, tuple)) else (found,)
        if not detectors:
            raise ConfigError("a guard needs at least one detector")
        for det in detectors:
            if not isinstance(det, Detector):
                raise ConfigError(
                    f"a guard needs a Detector (or several), got {type(det).__name__}; "
                    "load one with acteng.load_detector"
                )
        object.__setattr__(self, "detector", detectors[0] if len(detectors) == 1 else detectors)
        if len(detectors) > 1:
            if self.check != "prompt":
                raise ConfigError(
                    f"a guard over {len(detectors)} detectors checks the prompt only "
                    f"(check='prompt'), not {self.check!r}; watch the generation with one "
                    "detector"
                )
            if self.threshold is not None:
                raise ConfigError(
                    "threshold overrides a single detector's; with several, each uses its "
                    "own calibrated threshold (set one with dataclasses.replace(detector, "
                    "threshold=...))"
                )
        if self.policy not in POLICIES:
            raise ConfigError(
                f"unknown guard policy {self.policy!r}; use one of {', '.join(POLICIES)}"
            )
        if self.check not in CHECKS:
            raise ConfigError(f"unknown guard check {self.check!r}; use one of {', '.join(CHECKS)}")
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
    def detectors(self) -> tuple[Detector, ...]:
        """The guard's detectors (one, or several read on the prompt)."""
        found = self.detector
        return found if isinstance(found, tuple) else (found,)

    @property
    def primary(self) -> Detector:
        """The detector that watches the generation (the only one, when it does)."""
        return self.detectors[0]

    @property
    def limits(self) -> tuple[float, ...]:
        """Each detector's prompt threshold."""
        if self.threshold is not None:
            return (float(self.threshold),)
        return tuple(det.threshold for det in self.detectors)

    @property
    def limit(self) -> float:
        """The prompt threshold of the primary detector."""
        return self.limits[0]

    def names(self) -> tuple[str, ...]:
        """A name per detector (its file's ``name`` metadata, else ``detector<i>``)."""
        return tuple(
            str(det.directions.metadata.get("name") or f"detector{i}")
            for i, det in enumerate(self.detectors)
        )

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
    # every detector's prompt score, in the guard's order; `prompt_score` is that of the
    # detector that fired (or came nearest to its threshold); `fired_by` its index
    prompt_scores: list[float] = field(default_factory=list)
    fired_by: int | None = None

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
            "prompt_scores": self.prompt_scores,
            "fired_by": self.fired_by,
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
        self.prompt_scores: list[float] = []  # every detector's, in the guard's order
        self.prompt_threshold: float | None = None  # the threshold `prompt_score` is read on
        self.fired_by: int | None = None  # which detector fired
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

    def on_prompt(self, score: float | Sequence[float]) -> Verdict:
        """The detector's score of the prompt (one per detector, in the guard's order, for
        a guard over several): it fires when any crosses its own threshold."""
        scores = [float(score)] if isinstance(score, (int, float)) else [float(x) for x in score]
        limits = self.guard.limits
        if len(scores) != len(limits):
            raise ConfigError(
                f"{len(scores)} prompt scores for a guard over {len(limits)} detectors"
            )
        margins = [x - limit for x, limit in zip(scores, limits, strict=True)]
        nearest = max(range(len(scores)), key=margins.__getitem__)
        self.prompt_scores = scores
        self.prompt_score = scores[nearest]
        self.prompt_threshold = limits[nearest]
        if not margins[nearest] > 0:
            return "go"
        self.fired_on, self.fired_by = "prompt", nearest
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
            self.fired_on, self.fired_by = "generation", 0
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
            text,
            self.prompt_score,
            self.fired_on,
            self.action,
            scores,
            self.fired_at,
            list(self.prompt_scores),
            self.fired_by,
        )
