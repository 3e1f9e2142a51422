"""Shared helpers for the benchmark scripts (timing, reporting, workloads)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def interleaved(conditions: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Time each condition once per round, in rotating order, so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in conditions}
    names = list(conditions)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            conditions[name]()
            times[name].append(time.perf_counter() - start)
    return times


def greedy_run(model: Any, prompt: str, tokens: int) -> Callable[[], None]:
    """A callable generating exactly `tokens` greedy tokens for one chat prompt (batch 1)."""
    batch = model.tokenizer(
        [model.render_prompt(prompt)], add_special_tokens=False, return_tensors="pt"
    )

    def run() -> None:
        with torch.no_grad():
            out = model.hf.generate(
                **batch,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=model.tokenizer.pad_token_id,
            )
        assert out.shape[1] == batch["input_ids"].shape[1] + tokens

    return run


def median(values: list[float]) -> float:
    return statistics.median(values)


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def workload_pairs(n: int = 240) -> list[tuple[str, str, str]]:
    """(prompt, positive, negative) from bundled prompted sets, first n."""
    import acteng

    rows: list[tuple[str, str, str]] = []
    for name in ("sentiment", "formality", "honesty"):
        rows += [(p.prompt or "", p.positive, p.negative) for p in acteng.load_pairs(name)]
    return rows[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(
    options: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300
) -> Iterator[str]:
    """`acteng serve OPTIONS` on a free loopback port, from this interpreter; yields its
    base URL once /health answers, and stops the server on the way out."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    code = "import sys; from acteng.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "serve", "--port", str(port), *options]
    server = subprocess.Popen(argv, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise SystemExit(f"acteng serve exited with {server.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit(f"acteng serve did not answer /health in {timeout:.0f} s")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
