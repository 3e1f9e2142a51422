"""Helpers for the vLLM tests: skip without vLLM, build one engine, reach into its worker,
start real server processes and check they end.

The vLLM tests run in the environment ``scripts/setup-vllm`` makes (``.venv-vllm``); in
any other environment they are skipped. vLLM starts in-process (one process, no engine-core
or worker subprocess) so the tests can look at the model runner.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vLLM is not installed: run scripts/setup-vllm and use .venv-vllm"
)

# vLLM and the torch parts it imports raise deprecation warnings of their own (torch.jit,
# torch.distributed.reduce_op); the suite turns warnings into errors, so these modules let
# those two kinds through.
VLLM_WARNINGS = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

# One process: the tests inspect the worker and compare engines side by side.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

# vLLM's CPU backend traces the model once with Dynamo and then has Inductor generate C++
# kernels for the graph; the code generation takes 4-6 minutes a start on CI's two cores,
# against about one minute without it. VLLM_CPU_CI_ENV=1 is vLLM's own switch for its CPU
# tests: the same Dynamo trace (so the hooks must still be inside the captured graph, and
# the engine is still in compiled mode, not eager), run by Dynamo's eager backend. One test
# keeps the full Inductor path end to end (test_compile_cache: it needs the compile cache
# anyway). Set VLLM_CPU_CI_ENV=0 to run every test through Inductor.
os.environ.setdefault("VLLM_CPU_CI_ENV", "1")
INDUCTOR_ENV = {"VLLM_CPU_CI_ENV": "0"}

ENGINE_ARGS: dict[str, Any] = {
    "dtype": "float32",  # vLLM's bf16 CPU kernels are not batch-invariant
    "max_model_len": 1024,
    "max_num_seqs": 8,
    "seed": 0,
    "kv_cache_memory_bytes": 1 << 30,
    "gpu_memory_utilization": 0.3,
    "disable_log_stats": True,
}


class PairLayer(torch.nn.Module):
    """A stand-in for a vLLM decoder layer (no vLLM needed): it takes the token positions
    first and returns ``(hidden, residual)``, here as given, so a hook's change shows."""

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden, residual


def make_llm(model_dir: str, **overrides: Any) -> Any:
    from vllm import LLM

    return LLM(model=model_dir, **{**ENGINE_ARGS, **overrides})


def runner_of(llm: Any) -> Any:
    """The in-process model runner of an offline `LLM` (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner


def assert_hooked_and_compiled(llm: Any, layers: int) -> Any:
    """Assert the plugin hooked all `layers` decoder layers of an engine in vLLM's compiled
    mode (not eager), so steering is shown inside the compiled graph; returns the runner."""
    from vllm.config import CompilationMode

    runner = runner_of(llm)
    assert len(runner._acteng_steering.handles) == layers
    config = runner.vllm_config
    assert not config.model_config.enforce_eager
    assert config.compilation_config.mode != CompilationMode.NONE
    return runner


def greedy(max_tokens: int = 24, steering: list[dict[str, Any]] | None = None, **kw: Any) -> Any:
    from vllm import SamplingParams

    extra = {"steering": steering} if steering else None
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra, **kw)


def token_ids(llm: Any, prompts: list[list[int]], params: Any) -> list[list[int]]:
    many = params if isinstance(params, list) else [params] * len(prompts)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], many, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


# ---- real server processes (test_compile_cache, test_shutdown, test_openai_server) ----

STARTUP_S = 600  # a vLLM start on CI's two cores takes 2-6 minutes
SHUTDOWN_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def start_until_healthy(
    command: list[str], env: dict[str, str], base: str, log_path: Path
) -> subprocess.Popen[bytes]:
    """Start a server process (output to `log_path`) and return once `base`/health answers;
    fail the test, with the log's tail, if it exits first or takes over STARTUP_S."""
    with log_path.open("w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_S
    while True:
        if server.poll() is not None:
            pytest.fail(f"the server exited early:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"the server did not answer /health:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5):
                return server
        except OSError:
            time.sleep(2)


def running(process: Any) -> bool:
    """Alive, not a zombie: an orphan that has exited waits as a zombie until something
    reaps it, which in a container whose init does not reap may be never."""
    import psutil

    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def assert_signal_ends_every_process(
    server: subprocess.Popen[bytes], sig: signal.Signals, log_path: Path
) -> None:
    """Send `sig` to an ``acteng serve --engine vllm`` process with vLLM's usual layout (an
    engine-core process, which starts a worker): within SHUTDOWN_S the server and every
    descendant must be gone (issue 19: the engine core and its worker used to outlive a
    SIGTERM, re-parented to init). Kills whatever is left either way."""
    import psutil

    tree: list[Any] = []
    try:
        tree = psutil.Process(server.pid).children(recursive=True)
        # vLLM's engine core, and the worker it starts, are running.
        assert len(tree) >= 2, [p.name() for p in tree]
        server.send_signal(sig)
        status = server.wait(timeout=SHUTDOWN_S)
        _, alive = psutil.wait_procs(tree, timeout=1)
        alive = [p for p in alive if running(p)]
        log = log_path.read_text()
        assert not alive, f"still running: {[(p.pid, p.name()) for p in alive]}\n{log[-3000:]}"
        assert status == (128 + signal.SIGTERM if sig == signal.SIGTERM else 0), log[-3000:]
    finally:
        kill_tree(server, tree)


def kill_tree(server: subprocess.Popen[bytes], tree: list[Any] | None = None) -> None:
    """Kill a server process and its descendants (`tree`, or those it has now)."""
    import psutil

    if tree is None:
        try:
            tree = psutil.Process(server.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
    server.kill()
    server.wait(timeout=SHUTDOWN_S)
    for process in tree:
        if running(process):
            process.kill()
