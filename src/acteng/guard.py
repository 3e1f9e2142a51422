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

A guard may watch several detectors at once (``Guard([harmful, injection], ...)``): the
prompt fires when any of them crosses its own threshold, and the result says which one
did. Several detectors check the prompt only; watching the generation takes one detector.

The policy itself is `GuardState` (`acteng.guard_policy`, with `Guard` and `GuardResult`,
re-exported here), one per row, fed scores and answering go / steer /
stop; the server's rows (`acteng.server.rows`) run the same class, and the per-token
scores come from the same `acteng.monitoring.Readout`, so a library run and a served
request reach the same verdict at the same token (tests/server/test_guard_parity.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from acteng.detectors import check_target_fpr
from acteng.errors import ConfigError
from acteng.generation import eos_ids, generate_ids
from acteng.guard_policy import (
    CHECKS,
    DEFAULT_REFUSAL,
    POLICIES,
    Guard,
    GuardResult,
    GuardState,
    Verdict,
)
from acteng.hooks import ForwardContext, hooked
from acteng.joint_calibration import calibrate_jointly
from acteng.models import Model
from acteng.monitoring import LayerMeans, Readout
from acteng.steering.apply import steer
from acteng.steering.spec import SteeringSpec
from acteng.vectors import SteeringVector

__all__ = [
    "CHECKS",
    "DEFAULT_REFUSAL",
    "POLICIES",
    "Guard",
    "GuardResult",
    "GuardState",
    "Verdict",
    "calibrate_generation",
    "calibrate_prompt",
    "guarded_generate",
]


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
        detector = states[0].guard.primary
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
    for det in guard.detectors:
        det.directions.check_compatible(model)
    states = [GuardState(guard) for _ in texts]
    if states[0].checks_prompt:
        per_detector = [det.score(model, texts) for det in guard.detectors]
        for i, state in enumerate(states):
            state.on_prompt([scores[i] for scores in per_detector])
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


def calibrate_prompt(
    model: Model,
    guard: Guard,
    benign_prompts: Sequence[str],
    *,
    target_fpr: float = 0.05,
    groups: Sequence[str] | None = None,
) -> Guard:
    """The guard with prompt thresholds at which it fires on `target_fpr` of benign prompts.

    With several detectors, their thresholds are set together so that *any of them*
    firing happens on `target_fpr` of the prompts (`acteng.joint_calibration`), not each
    on its own share, which adds up. Use prompts like the deployment's traffic, held out
    from what the detectors were trained on; with `groups` (a kind per prompt, e.g.
    "chat" / "documents"), it fires on at most `target_fpr` of every kind. A `threshold`
    override is dropped.
    """
    detectors = calibrate_jointly(
        model, guard.detectors, benign_prompts, target_fpr, source="calibrate_prompt", groups=groups
    )
    return replace(guard, detector=detectors, threshold=None)


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
    check_target_fpr(target_fpr)
    if len(benign_prompts) < 10:
        raise ConfigError(f"calibration needs at least 10 prompts, got {len(benign_prompts)}")
    probe = Guard(guard.primary, policy="flag", check="generation", generation_threshold=1e30)
    runs = guarded_generate(model, list(benign_prompts), probe, max_new_tokens=max_new_tokens)
    peaks = torch.tensor(
        [max(r.generation_scores) for r in runs if r.generation_scores], dtype=torch.float64
    )
    if peaks.numel() == 0:
        raise ConfigError("no answer was long enough to score; raise max_new_tokens")
    return replace(guard, generation_threshold=float(torch.quantile(peaks, 1.0 - target_fpr)))
