"""One request's row in the running batch: sampling, text, stops, monitor scores, the guard.

A token's monitor score is read where the model reads that token (its own position, as in
`acteng.monitor`), i.e. in the step that feeds it back. A row with monitors or a
generation guard therefore sends each token together with its scores one step after
sampling it, and feeds its last token once more at the length limit so that it has
scores too; a row without them sends each token as soon as it is sampled.
"""

from __future__ import annotations

import math
import secrets
from typing import TYPE_CHECKING, Any

import torch

from acteng.generation import eos_ids
from acteng.guard_policy import GuardState, Verdict
from acteng.models import Model
from acteng.server.events import Event, Job
from acteng.steering.spec import SteeringSpec

if TYPE_CHECKING:
    from acteng.server.requests import Monitored

__all__ = ["Row"]


class Row:
    """The state of one request while it decodes in cache row `index`."""

    def __init__(self, job: Job, index: int, model: Model) -> None:
        self.job, self.index, self.model = job, index, model
        self.request = request = job.request
        self.eos = eos_ids(model)
        self.length = 0  # tokens in this row's cache
        self.generated: list[int] = []
        self.fed = 0  # generated tokens fed back (and so scored)
        self.emitted = 0  # generated tokens sent to the client
        self.sent = ""  # text sent to the client
        self.next_input = 0
        self.done = False
        self.finish_reason: str | None = None
        self.final_feed = False
        self._cut = False  # a stop string ended the text
        self.generator: torch.Generator | None = None
        if request.temperature > 0:
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed)
        self.prompt_scores: dict[str, list[float]] = {}
        self.token_scores: dict[str, list[float]] = {m.key: [] for m in request.monitors}
        # the guard's policy is `GuardState`'s, as in `guarded_generate`
        self.guard_state = None if request.guard is None else GuardState(request.guard)
        self.watch = self.guard_state is not None and self.guard_state.watches
        self.needs_scores = bool(request.monitors) or self.watch
        self.guard_steer_pending = False  # counter-steering starts: rewrite the table row

    # --- what the engine asks ------------------------------------------------------------
    def steering(self) -> list[SteeringSpec]:
        specs = list(self.request.steering)
        if self.guard_state is not None and self.guard_state.steering:
            specs += list(self.guard_state.guard.steering)
        return specs

    def monitored(self) -> list[Monitored]:
        found = list(self.request.monitors)
        if self.watch and self.request.guard_monitor is not None:
            found.append(self.request.guard_monitor)
        return found

    def check_prompt_guard(self) -> Verdict:
        """Score the prompt when the guard checks it; "stop" means do not generate."""
        if self.guard_state is None or not self.guard_state.checks_prompt:
            return "go"
        texts = list(self.request.guard_texts)
        detectors = self.guard_state.guard.detectors
        return self.guard_state.on_prompt([max(d.score(self.model, texts)) for d in detectors])

    # --- results of forward calls --------------------------------------------------------
    def prefilled(self, logits: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
        """After the prompt's forward call: `logits` [vocab], `scores` key -> [prompt_len]."""
        self.prompt_scored(scores)
        self._accept(self._sample(logits))

    def decoded(self, logits: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
        """After a decoding step that fed `next_input`: `scores` key -> [1]."""
        if self.scored(scores):
            self.sampled(self._sample(logits))

    # The two halves of `prefilled` and `decoded`, for an engine that samples itself (vLLM):
    # scores first, then the token sampled in the same forward call.
    def prompt_scored(self, scores: dict[str, torch.Tensor]) -> None:
        """The prompt's scores, key -> [prompt_len]."""
        self.length = len(self.request.prompt_ids)
        for key in self.token_scores:
            if key in scores:
                self.prompt_scores[key] = scores[key].tolist()

    def scored(self, scores: dict[str, torch.Tensor]) -> bool:
        """The scores of `next_input`, key -> [1]; False when the row ends on them (the
        guard stopped it, or they were the last token's), so that no token follows."""
        self.length += 1
        for key in self.token_scores:
            self.token_scores[key].append(float(scores[key][0]))
        self.fed += 1
        guard_key = self.request.guard_monitor.key if self.request.guard_monitor else None
        if self.guard_state is not None and self.watch and guard_key is not None:
            verdict = self.guard_state.on_token(float(scores[guard_key][0]))
            if verdict == "steer":
                self.guard_steer_pending = True
            elif verdict == "stop":
                self._emit(self.fed)  # the tokens up to and including the crossing
                self.finish("content_filter")
                return False
        if self.final_feed:
            self._emit(self.fed)
            self.finish("length")
            return False
        return True

    def sampled(self, token: int) -> None:
        """The token sampled after the prompt or after `next_input`."""
        self._accept(token)
        if self.needs_scores and not self.done:
            self._emit(self.fed)

    # --- internals -----------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor) -> int:
        request = self.request
        if len(self.generated) < request.min_tokens:
            logits = logits.clone()
            logits[list(self.eos)] = -math.inf
        if self.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.double() / request.temperature, dim=-1)
        if request.top_p < 1.0:
            ordered, order = torch.sort(probs, descending=True)
            keep = ordered.cumsum(0) - ordered < request.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _accept(self, token: int) -> None:
        if token in self.eos:
            self._emit(len(self.generated))
            if not self.done:
                self.finish("stop")
            return
        self.generated.append(token)
        self.next_input = token
        if not self.needs_scores:
            self._emit(len(self.generated))
        if self.done:
            return
        if len(self.generated) >= self.request.max_tokens:
            if self.needs_scores:
                self.final_feed = True  # feed it once more, for its scores
            else:
                self.finish("length")

    def _emit(self, upto: int) -> None:
        """Send generated tokens [emitted, upto) and the new text they complete."""
        if upto <= self.emitted or self.done:
            return
        tokenizer = self.model.tokenizer
        new = self.generated[self.emitted : upto]
        start = self.emitted
        self.emitted = upto
        text = tokenizer.decode(self.generated[:upto], skip_special_tokens=True)
        stop_at = _find_stop(text, self.request.stop, len(self.sent))
        if stop_at is not None:
            text = text[:stop_at]
            self._cut = True
        elif text.endswith("\ufffd"):
            text = self.sent  # half a character: wait for the rest of its bytes
        else:
            text = text[: len(text) - _held_back(text, self.request.stop)]
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        scores = {k: v[start:upto] for k, v in self.token_scores.items() if v}
        self.job.sink(
            Event(
                "token",
                text=delta,
                tokens=[tokenizer.decode([t]) for t in new],
                scores={self.request.monitor_names[k]: s for k, s in scores.items()},
            )
        )
        if stop_at is not None:
            self.finish("stop")

    def finish(self, reason: str) -> None:
        if self.done:
            return
        if not self._cut:  # send what was held back for a stop string that never came
            text = self.model.tokenizer.decode(
                self.generated[: self.emitted], skip_special_tokens=True
            )
            if text.startswith(self.sent) and len(text) > len(self.sent):
                tail = text[len(self.sent) :]
                self.sent += tail
                self.job.sink(Event("token", text=tail))
        self.done = True
        self.finish_reason = reason
        self.job.sink(Event("done", finish_reason=reason, summary=self.summary()))

    def summary(self) -> dict[str, Any]:
        request = self.request
        tokenizer = self.model.tokenizer
        text = self.sent
        monitors: dict[str, Any] = {}
        for monitor in request.monitors:
            scores = self.token_scores[monitor.key][: self.emitted]
            ids = self.generated[: len(scores)]
            entry: dict[str, Any] = {
                "kind": "detector" if monitor.detector is not None else "vector",
                "layers": list(monitor.layers),
                "tokens": [tokenizer.decode([t]) for t in ids],
                "scores": scores,
                "mean": sum(scores) / len(scores) if scores else None,
                "prompt_scores": self.prompt_scores.get(monitor.key, []),
            }
            if monitor.detector is not None:
                entry["threshold"] = monitor.detector.threshold
            monitors[monitor.name] = entry
        out: dict[str, Any] = {
            "text": text,
            "prompt_tokens": len(request.prompt_ids),
            "completion_tokens": len(self.generated),
            "acteng": {"steering": request.steering_echo, "monitor": monitors},
        }
        if request.ignored:
            out["acteng"]["ignored"] = list(request.ignored)
        if self.guard_state is not None:
            guard, verdict = self.guard_state.guard, self.guard_state.result(text)
            read_on = self.guard_state.prompt_threshold
            out["text"] = verdict.text
            names = request.guard_names
            out["acteng"]["guard"] = {
                "detector": names[0] if len(names) == 1 else list(names),
                "policy": guard.policy,
                "check": guard.check,
                "flagged": verdict.flagged,
                "fired_on": verdict.fired_on,
                "fired_by": None if verdict.fired_by is None else names[verdict.fired_by],
                "action": verdict.action,
                "prompt_score": verdict.prompt_score,
                "prompt_scores": dict(zip(names, verdict.prompt_scores, strict=False)),
                # the threshold of the detector whose score `prompt_score` is
                "threshold": guard.limit if read_on is None else read_on,
                "thresholds": dict(zip(names, guard.limits, strict=True)),
                "generation_threshold": guard.generation_limit if self.watch else None,
                "generation_scores": verdict.generation_scores,
                "fired_at": verdict.fired_at,
            }
        return out


def _find_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Where the first stop string starts in `text` (searching past what was sent)."""
    if not stops:
        return None
    longest = max(len(s) for s in stops)
    begin = max(0, sent - longest)
    found = [i for i in (text.find(s, begin) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could be the start of a stop string (not sent yet)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold
