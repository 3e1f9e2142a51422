"""Throughput of per-request steering inside vLLM, and vLLM next to acteng's own engine.

One process, CPU, the default model (SmolLM2-135M-Instruct) in float32, the 16 chat
requests of bench/serve_load.py, each generating exactly --tokens tokens (``min_tokens``),
all submitted at once through the serving engines' own interface (the code behind
``acteng serve``, without HTTP):

- **plain**: a vLLM engine with acteng's plugin turned off (no hooks);
- **hooked 0 % / 50 % / 100 %**: a vLLM engine with all 30 layers hooked, with none, half
  or all of the requests steered (mixed vectors and modes, as in serve_load.py);
- **acteng serve**: acteng's transformers engine (16 slots) on the same 16 requests,
  100 % steered.

Conditions run in rotating order for --rounds rounds so drift on a shared machine hits
all alike; the median wall time of each is compared. Floor: every hooked condition
>= 0.95x the plain engine's throughput. Saves bench/results/vllm_steer.json.

    .venv-vllm/bin/python bench/vllm_steer.py [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, save
from serve_load import PROMPTS, SETTINGS

FLOOR = 0.95


def _requests(model: Any, steered: list[bool], tokens: int) -> list[Any]:
    from acteng.library import VectorLibrary
    from acteng.server.requests import Limits, parse_request
    from acteng.server.resolve import Resolver

    resolver = Resolver(model, VectorLibrary())
    out = []
    for i, prompt in enumerate(PROMPTS):
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "min_tokens": tokens,
            "temperature": 0,
        }
        if steered[i]:
            body["steering"] = SETTINGS[i % len(SETTINGS)]
        out.append(parse_request(body, chat=True, resolver=resolver, limits=Limits()))
    return out


def _run_all(engine: Any, requests: list[Any]) -> dict[str, Any]:
    """Submit every request at once; wait until all are done."""
    from acteng.server.engine import Event

    left = threading.Semaphore(0)
    results: list[dict[str, Any]] = [{} for _ in requests]

    def sink_for(i: int) -> Any:
        def sink(event: Event) -> None:
            if event.kind == "done":
                results[i] = {"text": event.summary["text"], **event.summary}
                left.release()
            elif event.kind == "error":
                results[i] = {"error": event.text}
                left.release()

        return sink

    for i, request in enumerate(requests):
        engine.submit(request, sink_for(i))
    for _ in requests:
        left.acquire()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"requests failed: {errors[:3]}")
    return {"tokens": sum(r["completion_tokens"] for r in results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import acteng
    from acteng.server.engine import Engine
    from acteng.vllm_engine.serve import VllmEngine

    model = acteng.load_model()
    n = len(PROMPTS)
    plans = {
        "hooked_0pct": [False] * n,
        "hooked_50pct": [i % 2 == 0 for i in range(n)],
        "hooked_100pct": [True] * n,
    }
    requests = {name: _requests(model, plan, args.tokens) for name, plan in plans.items()}
    started = time.perf_counter()
    plain = VllmEngine(
        model, dtype="float32", engine_args={"additional_config": {"acteng": {"steering": False}}}
    )
    plain_start_s = time.perf_counter() - started
    started = time.perf_counter()
    hooked = VllmEngine(model, dtype="float32")
    hooked_start_s = time.perf_counter() - started
    own = Engine(model, slots=16, context=1024)
    engines = [plain, hooked, own]
    for engine in engines:
        engine.start()
    try:
        warm_plain, warm_steered = (_requests(model, [s] * n, 4) for s in (False, True))
        _run_all(plain, warm_plain)  # the plain engine refuses steering
        _run_all(hooked, warm_steered)
        _run_all(own, warm_steered)
        conditions = {
            "plain": lambda: _run_all(plain, requests["hooked_0pct"]),
            **{name: (lambda r=r: _run_all(hooked, r)) for name, r in requests.items()},
            "acteng_serve_100pct": lambda: _run_all(own, requests["hooked_100pct"]),
        }
        times = interleaved(conditions, args.rounds)
    finally:
        for engine in engines:
            engine.stop()
        plain.close()
        hooked.close()

    tokens = n * args.tokens
    median = {name: statistics.median(values) for name, values in times.items()}
    tok_s = {name: tokens / s for name, s in median.items()}
    ratios = {name: tok_s[name] / tok_s["plain"] for name in plans}
    vllm_vs_acteng = tok_s["hooked_100pct"] / tok_s["acteng_serve_100pct"]
    ok = all(r >= FLOOR for r in ratios.values())
    payload = {
        "model": model.name,
        "dtype": "float32",
        "requests": n,
        "tokens_per_request": args.tokens,
        "rounds": args.rounds,
        "engine_start_s": {"plain": plain_start_s, "hooked": hooked_start_s},
        "wall_s": times,
        "tokens_per_s": tok_s,
        "hooked_vs_plain": ratios,
        "floor": FLOOR,
        "floor_met": ok,
        "vllm_100pct_vs_acteng_serve_100pct": vllm_vs_acteng,
    }
    path = save("vllm_steer", payload)
    print(f"engine start: plain {plain_start_s:.0f} s, hooked {hooked_start_s:.0f} s")
    for name in times:
        print(f"{name:22s} median {median[name]:6.2f} s  {tok_s[name]:7.1f} tok/s")
    for name, ratio in ratios.items():
        print(f"{name} vs plain vLLM: {ratio:.3f}x (floor {FLOOR}x)")
    print(f"vLLM (100 % steered) vs acteng serve (100 % steered): {vllm_vs_acteng:.2f}x")
    print(f"saved {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
