"""The step loop both trainers share: optimise, log, show progress, checkpoint.

Each step's losses come from the trainer (`StepLosses`); the loop checks the total is
finite (else the last finished step's adapter is kept and `TrainingError` names it),
steps the optimiser, records the parts and the elapsed time, prints a progress line with
an ETA, and saves every `checkpoint_every` steps and at the end. Ctrl-C saves the last
finished step and re-raises. Restoring the caller's model is the trainer's job (its
``finally``), because only it knows what it changed. `check_positive` is the check both
trainers make of their rates and weights before anything runs.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from acteng.errors import ConfigError, TrainingError

__all__ = ["Save", "StepLosses", "TrainLog", "check_positive", "run_steps", "show_progress"]

# step -> (total loss to minimise, named parts to log)
StepLosses = Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
Save = Callable[[int, bool], Path]  # (steps done, interrupted) -> the folder written
OnStep = Callable[[int, dict[str, float]], None]


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
    try:
        for step in range(1, steps + 1):
            loss, parts = step_losses(step)
            if not torch.isfinite(loss):
                # the weights are still those of the last finished step: keep them
                kept = save(log.done, True) if log.done else None
                shown = ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items())
                raise TrainingError(
                    f"the {method} loss became non-finite at step {step} ({shown}); {advice}"
                    + (f"; the adapter of step {log.done} is kept at {kept}" if kept else ""),
                    checkpoint=None if kept is None else str(kept),
                )
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
        if log.done:
            save(log.done, True)
        raise
    return log


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
