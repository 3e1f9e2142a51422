"""The server engine on a GPU: its compiled decoding step against its eager one.

Builds a random-weight model with a real model's shape (as `compiled_gpu.py` does; no
weights or tokenizer needed) and runs the `acteng serve` engine directly (no HTTP): 16
requests x 64 new tokens, submitted at once so they decode together, interleaved per
round:

- ``off``: nothing steered,
- ``all_layers``: one vector on every layer, every request,
- ``per_row``: a distinct vector per request, every layer,
- ``per_row_monitored``: as ``per_row``, and every request reads two monitors,

each on the compiled engine (`acteng.server.compiled_step`), plus ``off`` on the eager
engine (the per-row attention loop) for the gain of compiling. Vectors change every call;
dynamo's graph count before and after the timed rounds must not change.

    PYTHONPATH=src python3 bench/serve_gpu.py                # on a CUDA machine
    python bench/serve_gpu.py --shape tiny --device cpu --backend eager --tokens 8   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

import acteng
from acteng.monitoring import Readout
from acteng.server.engine import Engine, Event
from acteng.server.requests import GenerationRequest, Monitored
from acteng.steering.spec import SteeringSpec
from compiled_gpu import SHAPES, add_dtype_argument, build, chosen_dtype


class _Tokenizer:
    """What the engine asks of a tokenizer, for a model without one."""

    eos_token_id = 2
    pad_token_id = 0

    def decode(self, ids: list[int], **_: Any) -> str:
        return " ".join(map(str, ids))


def _monitor(model: acteng.Model, vector: acteng.SteeringVector, key: str) -> Monitored:
    """A monitor as the server resolves one: units on the model's device and dtype."""
    readout = Readout.of(model, vector)
    return Monitored(key=key, name=key, layers=readout.layers, units=readout.units)


def _run_all(engine: Engine, requests: list[GenerationRequest]) -> int:
    """Submit all, wait for all; the number of tokens generated. A request that fails
    stops the bench (a failed request would time as a fast one)."""
    left = threading.Semaphore(0)
    tokens = [0]
    errors: list[str] = []

    def sink(event: Event) -> None:
        if event.kind == "done":
            tokens[0] += int(event.summary["completion_tokens"])
        if event.kind in ("done", "error"):
            if event.kind == "error":
                errors.append(str(event.text))
            left.release()

    for request in requests:
        engine.submit(request, sink)
    for _ in requests:
        left.acquire()
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(requests)} requests failed: {errors[0]}")
    return tokens[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    add_dtype_argument(parser)
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/)")
    args = parser.parse_args()
    dtype = chosen_dtype(args)
    model = build(args.shape, args.device, dtype)
    model.tokenizer = _Tokenizer()  # type: ignore[assignment]
    n = args.requests
    generator = torch.Generator().manual_seed(0)

    def vector() -> acteng.SteeringVector:
        directions = {
            x: 0.01 * torch.randn(model.hidden_size, generator=generator)
            for x in range(model.num_layers)
        }
        return acteng.SteeringVector(directions, {"model": model.identity(), "method": "random"})

    pools = [[vector() for _ in range(n)] for _ in range(2)]  # alternated: new values each call
    monitors = [_monitor(model, vector(), f"m{i}") for i in range(2)]
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = [
        torch.randint(3, vocab, (args.prompt,), generator=generator).tolist() for _ in range(n)
    ]
    calls = [0]

    def requests(kind: str) -> list[GenerationRequest]:
        calls[0] += 1
        pool, c = pools[calls[0] % 2], 4.0 + calls[0] % 3
        out = []
        for i, ids in enumerate(prompts):
            steering: tuple[SteeringSpec, ...] = ()
            if kind == "all_layers":
                steering = (SteeringSpec(pool[0], c),)
            elif kind.startswith("per_row"):
                steering = (SteeringSpec(pool[i], c + i),)
            reads = tuple(monitors) if kind == "per_row_monitored" else ()
            out.append(
                GenerationRequest(
                    prompt_ids=ids,
                    max_tokens=args.tokens,
                    min_tokens=args.tokens,
                    steering=steering,
                    monitors=reads,
                )
            )
        return out

    kinds = ["off", "all_layers", "per_row", "per_row_monitored"]
    result: dict[str, Any] = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "dtype": str(dtype),
        "backend": args.backend,
        "requests": n,
        "new_tokens": args.tokens,
        "prompt_tokens": args.prompt,
        "rounds": args.rounds,
    }
    context = args.prompt + args.tokens + 8
    eager = Engine(model, slots=n, context=context, compiled=False)
    eager.start()
    try:
        _run_all(eager, requests("off"))  # warm-up
        eager_s = []
        for _ in range(max(1, args.rounds // 2)):
            start = time.perf_counter()
            tokens = _run_all(eager, requests("off"))
            eager_s.append(time.perf_counter() - start)
    finally:
        eager.stop()
    result["eager_off_tok_s"] = round(tokens / statistics.median(eager_s), 1)

    engine = Engine(
        model, slots=n, context=context, compiled=True, compile_options={"backend": args.backend}
    )
    engine.start()
    try:
        start = time.perf_counter()
        for kind in kinds:  # compile each step shape
            _run_all(engine, requests(kind))
        result["warmup_compile_s"] = round(time.perf_counter() - start, 1)
        before = int(counters["stats"]["unique_graphs"])
        times: dict[str, list[float]] = {k: [] for k in kinds}
        made: dict[str, int] = {}
        for r in range(args.rounds):
            for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
                start = time.perf_counter()
                made[kind] = _run_all(engine, requests(kind))
                times[kind].append(time.perf_counter() - start)
        result["recompiles_during_timed_rounds"] = int(counters["stats"]["unique_graphs"]) - before
    finally:
        engine.stop()
    medians = {k: statistics.median(v) for k, v in times.items()}
    result["seconds"] = {k: [round(x, 4) for x in v] for k, v in times.items()}
    result["tok_s"] = {k: round(made[k] / v, 1) for k, v in medians.items()}
    result["ratio_vs_off"] = {k: round(v / medians["off"], 4) for k, v in medians.items()}
    result["compiled_vs_eager_off"] = round(result["tok_s"]["off"] / result["eager_off_tok_s"], 2)
    print(json.dumps(result, indent=2), flush=True)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "serve_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
