"""Throughput of per-request steering inside vLLM, and vLLM next to acteng's own engine.

One process, CPU, the default model (SmolLM2-135M-Instruct) in float32, the 16 chat
requests of bench/serve_load.py, each generating exactly --tokens tokens (``min_tokens``),
all submitted at once through the serving engines' own interface (the code behind
``acteng serve``, without HTTP):

- **plain**: a vLLM engine with acteng's plugin turned off (no hooks);
- **hooked 0 % / 50 % / 100 %**: a vLLM engine with all 30 layers hooked, with none, half
  or all of the requests steered (mixed vectors and modes, as in serve_load.py);
- **hooked 100 % + 4 monitors**: the hooked engine, every request steered and reading 4
  monitors (a detector among them) token by token (issue 19);
- **acteng serve**: acteng's transformers engine (16 slots) on the same 16 requests,
  100 % steered.

Conditions run in rotating order for --rounds rounds so drift on a shared machine hits
all alike; the median wall time of each is compared.

Build order: in one process, whichever vLLM engine is built second decodes about 4.5 %
faster here (measured both ways: hooked built second 1.05-1.08x the plain engine, built
first 0.95-0.96x). So by default the script runs twice, each order in a fresh process, and the
figures are the geometric mean of the two orders' ratios, which cancels a factor that
favours one position. Floor: every hooked condition >= 0.95x the plain engine's
throughput, and 100 % steered with 4 monitors >= 0.95x 100 % steered alone. Saves
bench/results/vllm_steer.json.

    .venv-vllm/bin/python bench/vllm_steer.py [--tokens 64] [--rounds 3] [--order both]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, interleaved, save
from serve_load import PROMPTS, SETTINGS

FLOOR = 0.95
MONITORS: list[Any] = [
    "honesty",
    "refusal",
    "harmful_request",
    {"vector": "harmful_request", "layers": [8]},
]


def _requests(
    model: Any, steered: list[bool], tokens: int, monitors: list[Any] | None = None
) -> list[Any]:
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
        if monitors:
            body["monitor"] = monitors
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
    parser.add_argument(
        "--order",
        choices=["both", "plain-first", "hooked-first"],
        default="both",
        help="which engine is built first; both = one fresh process per order (default)",
    )
    args = parser.parse_args()
    if args.order == "both":
        return _both_orders(args)

    import acteng
    from acteng.server.engine import Engine
    from acteng.vllm_engine.engine import VllmEngine

    model = acteng.load_model()
    n = len(PROMPTS)
    plans = {
        "hooked_0pct": [False] * n,
        "hooked_50pct": [i % 2 == 0 for i in range(n)],
        "hooked_100pct": [True] * n,
    }
    requests = {name: _requests(model, plan, args.tokens) for name, plan in plans.items()}
    monitored = _requests(model, [True] * n, args.tokens, MONITORS)

    def build(steering: bool) -> tuple[Any, float]:
        started = time.perf_counter()
        extra = {} if steering else {"additional_config": {"acteng": {"steering": False}}}
        engine = VllmEngine(model, dtype="float32", engine_args=extra)
        return engine, time.perf_counter() - started

    if args.order == "hooked-first":
        hooked, hooked_start_s = build(steering=True)
        plain, plain_start_s = build(steering=False)
    else:
        plain, plain_start_s = build(steering=False)
        hooked, hooked_start_s = build(steering=True)
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
            "hooked_100pct_4monitors": lambda: _run_all(hooked, monitored),
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
    monitors_vs_steering = tok_s["hooked_100pct_4monitors"] / tok_s["hooked_100pct"]
    ok = all(r >= FLOOR for r in ratios.values()) and monitors_vs_steering >= FLOOR
    payload = {
        "model": model.name,
        "dtype": "float32",
        "requests": n,
        "tokens_per_request": args.tokens,
        "rounds": args.rounds,
        "engine_start_s": {"plain": plain_start_s, "hooked": hooked_start_s},
        "built_first": args.order.removesuffix("-first"),
        "wall_s": times,
        "tokens_per_s": tok_s,
        "hooked_vs_plain": ratios,
        "floor": FLOOR,
        "floor_met": ok,
        "vllm_100pct_vs_acteng_serve_100pct": vllm_vs_acteng,
        "monitors_vs_steering": monitors_vs_steering,
    }
    path = save(f"vllm_steer_{args.order}", payload)
    print(f"engine start: plain {plain_start_s:.0f} s, hooked {hooked_start_s:.0f} s")
    for name in times:
        print(f"{name:22s} median {median[name]:6.2f} s  {tok_s[name]:7.1f} tok/s")
    for name, ratio in ratios.items():
        print(f"{name} vs plain vLLM: {ratio:.3f}x (floor {FLOOR}x)")
    print(f"vLLM (100 % steered) vs acteng serve (100 % steered): {vllm_vs_acteng:.2f}x")
    print(f"+ 4 monitors vs steering alone: {monitors_vs_steering:.3f}x (floor {FLOOR}x)")
    print(f"saved {path}")
    return 0 if ok else 1


def _both_orders(args: argparse.Namespace) -> int:
    """Run each build order in a fresh process; combine with geometric means."""
    runs: dict[str, dict[str, Any]] = {}
    for order in ("plain-first", "hooked-first"):
        out = RESULTS / f"vllm_steer_{order}.json"  # what the run saves (see main)
        out.unlink(missing_ok=True)  # never combine a stale run
        command = [sys.executable, __file__, "--order", order]
        command += ["--tokens", str(args.tokens), "--rounds", str(args.rounds)]
        print(f"--- {order}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=False)
        if not out.exists():
            print(f"the {order} run left no result; see its output above")
            return 2
        runs[order] = json.loads(out.read_text())
    names = list(runs["plain-first"]["hooked_vs_plain"])

    def geomean(values: list[float]) -> float:
        return math.prod(values) ** (1 / len(values))

    ratios = {
        name: geomean([run["hooked_vs_plain"][name] for run in runs.values()]) for name in names
    }
    vllm_vs_acteng = geomean([run["vllm_100pct_vs_acteng_serve_100pct"] for run in runs.values()])
    monitors = geomean([run["monitors_vs_steering"] for run in runs.values()])
    ok = all(r >= FLOOR for r in ratios.values()) and monitors >= FLOOR
    path = save(
        "vllm_steer",
        {
            "orders": runs,
            "hooked_vs_plain": ratios,
            "floor": FLOOR,
            "floor_met": ok,
            "vllm_100pct_vs_acteng_serve_100pct": vllm_vs_acteng,
            "monitors_vs_steering": monitors,
        },
    )
    print("--- both orders (geometric mean of the two ratios)")
    for name in names:
        each = " / ".join(f"{run['hooked_vs_plain'][name]:.3f}x" for run in runs.values())
        print(f"{name} vs plain vLLM: {ratios[name]:.3f}x ({each}; floor {FLOOR}x)")
    print(f"vLLM (100 % steered) vs acteng serve (100 % steered): {vllm_vs_acteng:.2f}x")
    print(f"+ 4 monitors vs steering alone: {monitors:.3f}x (floor {FLOOR}x)")
    print(f"saved {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
