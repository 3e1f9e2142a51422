"""``acteng serve --engine vllm`` ends every process it started on SIGTERM and SIGINT.

A real server process on the default model with vLLM's usual layout (an engine-core
process, which starts a worker process); once ``/health`` answers, the signal is sent and
within 30 s the server and every descendant must be gone (issue 19: the engine core and its
worker used to outlive a SIGTERM, re-parented to init).

SIGTERM, the signal that used to leave vLLM's processes behind, is checked on every run by
test_compile_cache, whose server start serves both checks (each vLLM start costs CI about
3.5 minutes). SIGINT runs the same shutdown (it passed here, 2026-12-03); set
ACTENG_TEST_SIGINT=1 to check it too, on a start of its own.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from tests.vllm_engine.support import (
    VLLM_WARNINGS,
    assert_signal_ends_every_process,
    free_port,
    needs_vllm,
    start_until_healthy,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.real, needs_vllm, *VLLM_WARNINGS]

SERVE = "import sys; from acteng.cli import main; sys.exit(main())"


@pytest.mark.skipif(
    not os.environ.get("ACTENG_TEST_SIGINT"),
    reason="SIGINT costs a vLLM start of its own: set ACTENG_TEST_SIGINT=1 (SIGTERM is "
    "checked by test_compile_cache)",
)
def test_sigint_ends_the_server_and_every_process_it_started(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACTENG_HOME": str(tmp_path / "home")}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's real layout: core + worker
    command = [sys.executable, "-c", SERVE, "serve", "--engine", "vllm"]
    command += ["--port", str(port), "--slots", "4", "--context", "512"]
    log_path = tmp_path / "serve.log"
    server = start_until_healthy(command, env, f"http://127.0.0.1:{port}", log_path)
    assert_signal_ends_every_process(server, signal.SIGINT, log_path)
