"""The step loop both trainers share: optimise, log, show progress, checkpoint.

Each step's losses come from the trainer (`StepLosses`); the loop checks the total is
sane (finite, and under `DIVERGED` times the first step's), steps the optimiser, records
the parts and the elapsed time, prints a progress line with an ETA, and saves every
`checkpoint_every` steps and at the end. A loss that is not sane was computed with the
weights of the last step, so those are the bad ones: the loop puts back the weights
before that step (the last that gave a sane loss), keeps them and raises
`TrainingError` naming them. Ctrl-C saves the last finished step, says where, and
re-raises. Restoring the caller's model is the trainer's job (its
``finally``), because only it knows what it changed. `check_positive` is the check both
trainers make of their rates and weights before anything runs.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from acteng.errors import ConfigError, TrainingError

log_ = logging.getLogger(__name__)

__all__ = [
    "DIVERGED",
    "Save",
    "StepLosses",
    "TrainLog",
    "check_positive",
    "run_steps",
    "show_progress",
]

# step -> (total loss to minimise, named parts to log)
StepLosses = Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
Save = Callable[[int, bool], Path]  # (steps done, interrupted) -> the folder written
OnStep = Callable[[int, dict[str, float]], None]

# A total loss this many times the first step's (or than 1, if that was smaller) has
# diverged (a learning rate far too high: RMU's retain loss went from ~0.01 to 1e18 at
# lr 1e6 while staying finite); no sane run of either trainer comes near it, as both
# losses start at or near their top.
DIVERGED = 1e3


@dataclass
class TrainLog:
    """What the loop did: steps finished, one record per step, the last checkpoint."""

    done: int = 0
    losses: list[dict[str, float]] = field(default_factory=list)
    last_good: Path | None = None

    def record(self, done: int, interrupted: bool) -> dict[str, Any]:
        """The ``"training"`` entry of a checkpoint's provenance."""
        return {
            "steps_done": done,
            "interrupted": interrupted,
            "first": self.losses[0] if self.losses else None,
            "last": self.losses[-1] if self.losses else None,
        }


def check_positive(**values: float) -> None:
    """Refuse any of `values` (rates, weights, scales) that is not a finite positive number."""
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number, got {value}")


def run_steps(
    method: str,
    steps: int,
    optimizer: torch.optim.Optimizer,
    step_losses: StepLosses,
    save: Save,
    log: TrainLog,
    *,
    advice: str,
    checkpoint_every: int,
    on_step: OnStep | None = None,
    progress: bool = False,
) -> TrainLog:
    """Run `steps` optimisation steps of `method` (see the module docstring), recording
    into `log` (which `save` may read); `advice` ends the error for a non-finite loss
    ("lower lr (0.001)")."""
    started = time.perf_counter()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    before: list[torch.Tensor] = []  # the weights before the last step: the last known good
    first = math.nan
    try:
        for step in range(1, steps + 1):
            loss, parts = step_losses(step)
            value = loss.item()
            first = value if step == 1 else first
            if not math.isfinite(value) or (
                step > 1 and abs(value) > DIVERGED * max(abs(first), 1)
            ):
                _end_line(progress and log.done > 0)
                raise _stopped(method, step, value, first, parts, advice, params, before, save, log)
            before = [p.detach().clone() for p in params]
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            log.done = step
            record = {"step": float(step), **{k: v.item() for k, v in parts.items()}}
            record["seconds"] = time.perf_counter() - started
            log.losses.append(record)
            if on_step is not None:
                on_step(step, record)
            if progress:
                _print_progress(method, step, steps, record)
            if step % checkpoint_every == 0 or step == steps:
                log.last_good = save(step, False)
    except KeyboardInterrupt:
        _end_line(progress and 0 < log.done < steps)
        if log.done:
            kept = save(log.done, True)
            log_.warning(
                "interrupted after step %d of %d: the adapter of step %d is kept at %s",
                log.done, steps, log.done, kept,
            )  # fmt: skip
        else:
            log_.warning("interrupted before the first step finished: nothing was written")
        raise
    return log


def _stopped(
    method: str,
    step: int,
    value: float,
    first: float,
    parts: dict[str, torch.Tensor],
    advice: str,
    params: list[torch.Tensor],
    before: list[torch.Tensor],
    save: Save,
    log: TrainLog,
) -> TrainingError:
    """The error for a loss that is not sane at `step`, after putting back and keeping the
    weights from before the last step (those of step - 2, the last that gave a sane loss;
    none is kept when that is the start)."""
    good = max(step - 2, 0)
    with torch.no_grad():
        for p, b in zip(params, before, strict=False):  # none before step 1's loss
            p.copy_(b)
    log.done, log.losses = good, log.losses[:good]
    kept = save(good, True) if good else None
    shown = ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items())
    what = (
        "became non-finite"
        if not math.isfinite(value)
        else f"diverged ({value:.4g}, over {DIVERGED:g} times its first value {first:.4g})"
    )
    where = (
        f"; the adapter of step {good}, the last with a sane loss, is kept at {kept}"
        if kept
        else "; no step gave a usable adapter, nothing is kept"
        + (f" ({log.last_good} holds the weights that failed: delete it)" if log.last_good else "")
    )
    return TrainingError(
        f"the {method} loss {what} at step {step} ({shown}); {advice}{where}",
        checkpoint=None if kept is None else str(kept),
    )


def _end_line(pending: bool) -> None:
    """End a progress line left open (it ends with a carriage return until the last step),
    so that what follows starts on a line of its own."""
    if pending:
        print(file=sys.stderr, flush=True)


def _print_progress(method: str, step: int, steps: int, record: dict[str, float]) -> None:
    rate = record["seconds"] / step
    parts = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("step", "seconds"))
    show_progress(
        f"{method} step {step}/{steps}  {parts}  {rate:.2f} s/step", step, steps, record["seconds"]
    )


def show_progress(text: str, done: int, total: int, seconds: float) -> None:
    """`text` and the ETA from `seconds` spent on `done` of `total` units, on one stderr
    line that the next call overwrites (a new line after the last)."""
    eta = seconds / done * (total - done)
    print(
        f"{text}  ETA {eta:.0f} s",
        end="\n" if done == total else "\r",
        file=sys.stderr,
        flush=True,
    )
