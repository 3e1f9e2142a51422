"""The shared step loop: what it keeps when a loss goes wrong or the user presses Ctrl-C."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from acteng.errors import TrainingError
from acteng.training.loop import DIVERGED, TrainLog, run_steps


def _run(losses: list[float], tmp_path: Path, checkpoint_every: int = 100):
    """run_steps on one weight w (starting at 0, +1 a step by SGD) whose loss at step k
    is losses[k - 1] (w's gradient is -1 whatever the value): returns the weight, the
    saves made (steps done, the weight then) and the error."""
    w = torch.nn.Parameter(torch.zeros(()))
    saves: list[tuple[int, float]] = []

    def step_losses(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = losses[step - 1] - w + w.detach()  # the value given, gradient -1
        return loss, {"part": loss.detach()}

    def save(done: int, interrupted: bool) -> Path:
        saves.append((done, w.item()))
        return tmp_path

    error = None
    try:
        run_steps("toy", len(losses), torch.optim.SGD([w], lr=1.0), step_losses, save,
                  TrainLog(), advice="lower lr", checkpoint_every=checkpoint_every)  # fmt: skip
    except TrainingError as exc:
        error = exc
    return w.item(), saves, error


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2.0 * DIVERGED])
def test_a_loss_gone_wrong_keeps_the_weights_before_the_step_that_made_it(
    bad: float, tmp_path: Path
) -> None:
    # the loss of step 4 is computed with the weights after step 3 (w = 3): those are
    # the bad ones, so the loop puts back and keeps w = 2, the weights of step 2
    w, saves, error = _run([1.0, 0.5, 0.8, bad, 0.1], tmp_path, checkpoint_every=3)
    assert error is not None and "at step 4" in str(error) and "lower lr" in str(error)
    assert ("diverged" in str(error)) == (bad == 2.0 * DIVERGED)
    assert "adapter of step 2" in str(error) and error.checkpoint == str(tmp_path)
    assert w == 2.0 and saves == [(3, 3.0), (2, 2.0)]  # the checkpoint of step 3 replaced


def test_a_loss_wrong_from_the_second_step_keeps_nothing(tmp_path: Path) -> None:
    w, saves, error = _run([1.0, float("nan")], tmp_path)
    assert error is not None and "no step gave a usable adapter" in str(error)
    assert error.checkpoint is None and saves == [] and w == 0.0
    w, saves, error = _run([float("nan")], tmp_path)  # at the first step: nothing to restore
    assert error is not None and "at step 1" in str(error) and error.checkpoint is None
    assert saves == [] and w == 0.0
    w, saves, error = _run([1.0, float("nan")], tmp_path, checkpoint_every=1)
    assert error is not None and error.checkpoint is None and "delete it" in str(error)


def test_ordinary_ups_and_downs_are_not_divergence(tmp_path: Path) -> None:
    w, saves, error = _run([1.0, 0.1, 50.0, 0.01], tmp_path)
    assert error is None and w == 4.0 and saves == [(4, 4.0)]


def test_ctrl_c_says_where_the_adapter_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = torch.nn.Parameter(torch.zeros(()))

    def step_losses(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if step == 3:
            raise KeyboardInterrupt
        return -w, {}

    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        run_steps("toy", 10, torch.optim.SGD([w], lr=1.0), step_losses, lambda d, i: tmp_path,
                  TrainLog(), advice="", checkpoint_every=100)  # fmt: skip
    assert f"interrupted after step 2 of 10: the adapter of step 2 is kept at {tmp_path}" in (
        caplog.text
    )
