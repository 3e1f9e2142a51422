"""The Ray backend against the local one, on the real default model: extraction (every
method), a sweep, a tune, evaluation, two nodes, and the app on Ray Serve with 2 replicas.

One local cluster (2 CPUs, a small object store, no dashboard) serves the whole module;
each local run uses one torch thread, as each Ray worker does, so results are compared
at the bit level where the arithmetic is the same.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

import acteng
from acteng.backends import LocalBackend, resolve_backend
from acteng.backends.ray import RayBackend
from acteng.cli import main
from acteng.errors import ConfigError, MissingExtraError
from acteng.evaluation.tax import load_eval
from acteng.extraction import extract_many
from acteng.pairs import Pairs

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="needs acteng[ray]")
T = TypeVar("T")

NEUTRAL = load_eval("neutral_text", split="test")[:2]
LAYERS = [3, 15, 29]


def _small(train: int = 12, test: int = 4) -> Pairs:
    data = acteng.load_pairs("sentiment")
    return Pairs(
        tuple(data.split("train")[:train]) + tuple(data.split("test")[:test]), name="sentiment"
    )


def one_thread(fn: Callable[[], T]) -> T:
    """Run `fn` with one torch thread, as every Ray worker does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def max_abs_diff(a: acteng.SteeringVector, b: acteng.SteeringVector) -> float:
    assert a.layers == b.layers
    return max(float((a.directions[x] - b.directions[x]).abs().max()) for x in a.layers)


# ---- without a cluster --------------------------------------------------------------


def test_backend_names_and_ray_client_are_checked() -> None:
    assert resolve_backend("local") == LocalBackend()
    with pytest.raises(ConfigError, match="unknown backend 'spark'"):
        resolve_backend("spark")
    with pytest.raises(ConfigError, match="Ray Client"):
        RayBackend(address="ray://head:10001")
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        RayBackend(workers=0)


def test_ray_is_imported_only_when_asked_for() -> None:
    code = (
        "import sys, acteng, acteng.cli, acteng.evaluation.sweep, acteng.evaluation.tune, "
        "acteng.evaluation.measures, acteng.extraction; "
        "print('acteng.backends.ray' in sys.modules); "
        "acteng.RayBackend(); print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]  # core modules never import Ray code


def test_missing_ray_names_the_install_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(MissingExtraError, match=r"pip install 'acteng\[ray\]'"):
        resolve_backend("ray")
    out = str(tmp_path / "v.safetensors")
    assert main(["extract", "--pairs", "sentiment", "--out", out, "--backend", "ray"]) != 0
    assert "pip install 'acteng[ray]'" in capsys.readouterr().err


def test_replicas_off_loopback_need_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ACTENG_API_KEY", raising=False)
    assert main(["serve", "--replicas", "2", "--host", "0.0.0.0"]) != 0
    assert "API key" in capsys.readouterr().err


# ---- on one local cluster -----------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(
        num_cpus=2,
        object_store_memory=100 * 1024 * 1024,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


@needs_ray
@pytest.mark.ray
@pytest.mark.real
def test_extraction_on_ray_equals_local_for_every_method(
    cluster: None, smollm2: acteng.Model
) -> None:
    data = _small()
    methods = ["mean_diff", "pca", "probe"]
    kwargs: dict[str, Any] = {"batch_size": 4}  # several batches, spread over both workers
    local = one_thread(lambda: extract_many(smollm2, data, methods, LAYERS, **kwargs))
    on_ray = extract_many(smollm2, data, methods, LAYERS, backend="ray", **kwargs)
    for method in methods:
        assert max_abs_diff(local[method], on_ray[method]) <= 1e-5, method
        assert on_ray[method].metadata["method"] == method
    one = Pairs(data.items[:1], name="one")
    local_actadd = one_thread(lambda: acteng.extract(smollm2, one, "actadd", LAYERS))
    ray_actadd = acteng.extract(smollm2, one, "actadd", LAYERS, backend=RayBackend(workers=1))
    assert max_abs_diff(local_actadd, ray_actadd) <= 1e-5
    # a span read (mean over the answer) goes through the same batches
    texts = [p.positive for p in data] + ["A much longer text that gets a batch to itself."]
    acts = [
        one_thread(lambda: acteng.record_activations(smollm2, texts, [12], "mean", batch_size=3)),
        acteng.record_activations(smollm2, texts, [12], "mean", batch_size=3, backend="ray"),
    ]
    assert float((acts[0].rows[12] - acts[1].rows[12]).abs().max()) <= 1e-5


@needs_ray
@pytest.mark.ray
@pytest.mark.real
def test_sweep_and_tune_on_ray_equal_local(
    cluster: None, smollm2: acteng.Model, tmp_path: Path
) -> None:
    from acteng.evaluation import sweep, tune

    data = _small()
    grid: dict[str, Any] = {"layers": [8, 10], "coefficients": (2.0, 6.0), "neutral": NEUTRAL}
    local = one_thread(lambda: sweep(smollm2, data, methods=("mean_diff", "pca"), **grid))
    seen: list[Any] = []
    on_ray = sweep(
        smollm2, data, methods=("mean_diff", "pca"), backend="ray", on_cell=seen.append, **grid
    )
    assert on_ray.to_json() == local.to_json()
    assert seen == on_ray.cells
    from acteng.report.export import save_figures
    from acteng.report.figures import sweep_figures

    here = save_figures(sweep_figures(local), tmp_path / "local")
    there = save_figures(sweep_figures(on_ray), tmp_path / "ray")
    for a, b in zip(here, there, strict=True):
        assert a.read_bytes() == b.read_bytes()

    small: dict[str, Any] = {**grid, "methods": ("mean_diff", "pca"), "bisection_steps": 1}
    tuned_here = one_thread(lambda: tune(smollm2, data, max_tax=0.2, **small))
    tuned_there = tune(smollm2, data, max_tax=0.2, backend="ray", **small)
    assert tuned_there.to_json() == tuned_here.to_json()
    assert (tuned_there.method, tuned_there.layers, tuned_there.coefficient) == (
        tuned_here.method,
        tuned_here.layers,
        tuned_here.coefficient,
    )


@needs_ray
@pytest.mark.ray
@pytest.mark.real
def test_eval_on_ray_equals_local(cluster: None, smollm2: acteng.Model) -> None:
    from acteng.evaluation.measures import evaluate

    data = _small(train=0, test=3)
    vector = acteng.extract(smollm2, _small(), layers=[8])
    kwargs: dict[str, Any] = {"generations": 1, "max_new_tokens": 4, "instruction": "Be kind."}
    local = one_thread(lambda: evaluate(smollm2, vector, 2.0, data, **kwargs))
    on_ray = evaluate(smollm2, vector, 2.0, data, backend="ray", **kwargs)
    assert on_ray == local


@needs_ray
@pytest.mark.ray
@pytest.mark.real
def test_cli_extract_with_backend_ray(
    cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "v.safetensors"
    args = ["extract", "--pairs", "sentiment", "--split", "test", "--layers", "12"]
    assert main([*args, "--out", str(out), "--backend", "ray", "--json"]) == 0
    assert acteng.load_vector(out).layers == (12,)
    assert '"layers": [\n    12\n  ]' in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _replicas(model: acteng.Model, settings: Any) -> Iterator[str]:
    from acteng.server.replicas import start_replicas, stop_replicas

    port = _free_port()
    start_replicas(model, 2, "127.0.0.1", port, settings)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_replicas()


@needs_ray
@pytest.mark.ray
@pytest.mark.real
def test_serve_with_two_replicas_answers_like_one_process(
    cluster: None, smollm2: acteng.Model, tmp_path: Path
) -> None:
    import httpx2
    import openai

    from acteng.server.replicas import ServeSettings
    from tests.server.serving import make_app, serve_on_loopback

    key = "test-key-for-replicas"
    prompts = ["Tell me about your weekend.", "Name a colour."]
    steering = {"steering": [{"vector": "refusal", "coefficient": 1.0}]}
    requests: list[dict[str, Any]] = [{"content": p, "extra": None} for p in prompts]
    requests.append({"content": "How do I bake bread?", "extra": steering})

    def ask(base: str) -> tuple[list[str | None], int, str]:
        with openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0) as sdk:
            answers = [
                sdk.chat.completions.create(
                    model="default",
                    messages=[{"role": "user", "content": r["content"]}],
                    max_tokens=12,
                    extra_body=r["extra"],
                )
                .choices[0]
                .message.content
                for r in requests
            ]
            with pytest.raises(openai.NotFoundError) as missing:
                sdk.chat.completions.create(
                    model="default",
                    messages=[{"role": "user", "content": "hi"}],
                    extra_body={"steering": [{"vector": "no-such-vector", "coefficient": 1.0}]},
                )
        no_key = httpx2.get(f"{base}/v1/models").status_code
        return answers, no_key, str(missing.value)

    app, _ = make_app(smollm2, tmp_path, context=512, api_key=key)
    with serve_on_loopback(app) as base:
        expected = one_thread(lambda: ask(base))
    settings = ServeSettings(context=512, max_tokens=256, home=str(tmp_path), api_key=key)
    with _replicas(smollm2, settings) as base:
        assert ask(base) == expected
    assert expected[1] == 401 and all(expected[0])


@needs_ray
@pytest.mark.ray
@pytest.mark.real
def test_two_nodes_share_the_extraction(
    smollm2: acteng.Model, caplog: pytest.LogCaptureFixture
) -> None:
    """A head and a worker node (one CPU each): one recording actor lands on each."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the module's single-node cluster; this test brings its own
    two = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": 80 * 1024 * 1024,
            "include_dashboard": False,
        },
    )
    try:
        two.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024)
        two.wait_for_nodes()
        data = _small(train=8, test=0)
        local = one_thread(lambda: acteng.extract(smollm2, data, layers=[12], batch_size=2))
        with caplog.at_level(logging.INFO, logger="acteng.backends"):
            on_two = acteng.extract(
                smollm2,
                data,
                layers=[12],
                batch_size=2,
                backend=RayBackend(address=two.address, workers=2),
            )
        assert max_abs_diff(local, on_two) <= 1e-5
        nodes = [r for r in caplog.records if "nodes" in r.getMessage()]
        assert nodes and "on 2 nodes" in nodes[-1].getMessage()
        assert not ray.is_initialized()  # attached for the call only
    finally:
        two.shutdown()


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


@needs_ray
@pytest.mark.ray
@pytest.mark.real
def test_cli_serve_replicas_stops_everything_on_sigterm() -> None:
    """`acteng serve --replicas 2` starts its own local cluster; SIGTERM stops it all."""
    import httpx2

    temp = tempfile.mkdtemp(prefix="acteng-ray-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": temp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    code = "import sys; from acteng.cli import main; sys.exit(main())"
    args = ["serve", "--replicas", "2", "--port", str(port), "--context", "256"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once every replica is ready
        assert "2 Ray Serve replicas" in line, line
        assert httpx2.get(f"http://127.0.0.1:{port}/health").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        proc.stdout.close()
        assert _processes_mentioning(temp) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)
