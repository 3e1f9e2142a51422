"""Compiled decoding on a GPU: what steering every layer and per-row vectors cost.

Builds a random-weight model with a real model's shape (default Llama-3-8B, bf16; no
weights needed), decodes with acteng's compiled path (static KV cache, torch.compile'd
step, steering hooks traced into the graph) and times, interleaved per round:

- ``off``: hooks attached, no row steered (the traced graph has no steering operations),
- ``all_layers``: one vector on all layers, every row,
- ``per_row`` (batch > 1): a distinct vector per row, all layers.

Before every timed call the vectors and coefficients are rewritten in place (new random
values), and the script counts dynamo's compiled graphs before and after the timed rounds:
steering changes must cost zero recompiles. Tokens/s are reported against the
memory-bandwidth limit for batch 1 (weights bytes / measured device copy bandwidth).

    PYTHONPATH=src python bench/compiled_gpu.py        # on a CUDA machine (no install)
    python bench/compiled_gpu.py --shape tiny --device cpu --backend eager   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

import acteng
from acteng.steering import compiled as compiled_path
from acteng.steering.compiled import CompiledSteering
from acteng.steering.spec import SteeringSpec

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    "llama3-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 512,
    },
}


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="default: bfloat16 on cuda, float32 elsewhere",
    )


def chosen_dtype(args: argparse.Namespace) -> torch.dtype:
    """`--dtype` (see `add_dtype_argument`), else bf16 on CUDA and float32 elsewhere."""
    return getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))


def build(shape: str, device: str, dtype: torch.dtype, tokenizer: Any = None) -> acteng.Model:
    """A random-weight model of `shape`, with `tokenizer` if given (the vocabulary grows
    to hold its ids: the tiny shape's is smaller than a real tokenizer's)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    sizes = dict(SHAPES[shape])
    if tokenizer is not None:
        sizes["vocab_size"] = max(sizes["vocab_size"], len(tokenizer))
    config = LlamaConfig(**sizes, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            hf = AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return acteng.Model(hf, tokenizer, name=f"random-{shape}")


def copy_bandwidth(device: str) -> float | None:
    """Bytes/s of a device-to-device copy (read + write), the decode step's bound."""
    if device != "cuda":
        return None
    x = torch.empty(2**30, dtype=torch.uint8, device=device)  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - start)


def measure(
    path: CompiledSteering,
    pools: list[list[acteng.SteeringVector]],
    batch_size: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Interleaved timings of the conditions at one batch size (see the module doc)."""
    device = path.model.device
    ids = torch.randint(3, SHAPES[args.shape]["vocab_size"], (batch_size, args.prompt))
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    calls = [0]

    def run(rows: list[list[SteeringSpec]]) -> None:
        path.generate_ids(
            batch,
            rows,
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            do_sample=False,
            pad_token_id=0,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()

    def specs(per_row: bool) -> list[list[SteeringSpec]]:
        calls[0] += 1
        pool, c = pools[calls[0] % 2], 4.0 + calls[0] % 3
        if per_row:
            return [[SteeringSpec(pool[i], c + i)] for i in range(batch_size)]
        return [[SteeringSpec(pool[0], c)]] * batch_size

    conditions: dict[str, Callable[[], None]] = {
        "off": lambda: run([[] for _ in range(batch_size)]),
        "all_layers": lambda: run(specs(per_row=False)),
    }
    if batch_size > 1:
        conditions["per_row"] = lambda: run(specs(per_row=True))
    warm_start = time.perf_counter()
    for fn in conditions.values():  # compile each graph (and record its CUDA graphs)
        fn()
        fn()
    warm_s = time.perf_counter() - warm_start
    graphs_before = int(counters["stats"]["unique_graphs"])
    times: dict[str, list[float]] = {name: [] for name in conditions}
    names = list(conditions)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            conditions[name]()
            times[name].append(time.perf_counter() - t)
    graphs_after = int(counters["stats"]["unique_graphs"])
    medians = {name: statistics.median(v) for name, v in times.items()}
    # The prefill runs eagerly (transformers compiles only the decoding step): time it
    # alone (one new token, no compiled step) to split each call into prefill + decode.
    tokens, args.tokens = args.tokens, 1
    prefill: dict[str, list[float]] = {name: [] for name in conditions}
    for _ in range(3):
        for name in names:
            t = time.perf_counter()
            conditions[name]()
            prefill[name].append(time.perf_counter() - t)
    args.tokens = tokens
    prefill_s = {name: statistics.median(v) for name, v in prefill.items()}
    decode_s = {name: medians[name] - prefill_s[name] for name in conditions}
    if args.profile:
        try:
            profile(conditions, batch_size)
        except Exception as error:  # a diagnostic only: never lose the timings for it
            print(f"profile failed: {error!r}", flush=True)
    return {
        "warmup_compile_s": round(warm_s, 1),
        "recompiles_during_timed_rounds": graphs_after - graphs_before,
        "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "tok_s": {k: round(batch_size * args.tokens / v, 1) for k, v in medians.items()},
        "ratio_vs_off": {k: round(v / medians["off"], 4) for k, v in medians.items()},
        "prefill_s": {k: round(v, 4) for k, v in prefill_s.items()},
        "decode_ms_per_step": {
            k: round(1000 * v / (args.tokens - 1), 3) for k, v in decode_s.items()
        },
        "decode_ratio_vs_off": {k: round(v / decode_s["off"], 4) for k, v in decode_s.items()},
    }


def profile(conditions: dict[str, Callable[[], None]], batch_size: int) -> None:
    """Print the GPU kernels of one call per condition (where the time goes)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, fn in conditions.items():
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        total = sum(e.self_device_time_total for e in kernels)
        launches = sum(e.count for e in kernels)
        print(
            f"--- profile batch {batch_size} {name}: GPU {total / 1000:.1f} ms in "
            f"{launches} kernel runs",
            flush=True,
        )
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]:
            print(f"  {e.self_device_time_total / 1000:8.2f} ms  x{e.count:5d}  {e.key[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print GPU kernels per condition")
    add_dtype_argument(parser)
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/)")
    args = parser.parse_args()
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per batch size
    dtype = chosen_dtype(args)
    start = time.perf_counter()
    model = build(args.shape, args.device, dtype)
    build_s = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    bandwidth = copy_bandwidth(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    path = compiled_path.for_model(model, max_batch=max(batches), backend=args.backend)
    generator = torch.Generator().manual_seed(0)
    # Two pools of per-row vectors, alternated by round: every timed call writes new values
    # into the same buffers (which must not recompile), and building them is not timed.
    pools = [
        [
            acteng.SteeringVector(
                {
                    layer: 0.01 * torch.randn(model.hidden_size, generator=generator)
                    for layer in range(model.num_layers)
                },
                {"model": model.identity(), "method": "random"},
            )
            for _ in range(max(batches))
        ]
        for _ in range(2)
    ]
    result: dict[str, Any] = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "dtype": str(dtype),
        "backend": args.backend,
        "mode": path.compile_options["mode"],
        "new_tokens": args.tokens,
        "prompt_tokens": args.prompt,
        "rounds": args.rounds,
        "weights_gb": round(weight_bytes / 1e9, 2),
        "build_s": round(build_s, 1),
        "copy_bandwidth_gbs": round(bandwidth / 1e9, 1) if bandwidth else None,
        "bandwidth_limit_tok_s_batch1": round(bandwidth / weight_bytes, 1) if bandwidth else None,
        "batches": {},
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "compiled_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    for batch_size in batches:
        row = measure(path, pools, batch_size, args)
        result["batches"][str(batch_size)] = row
        print(f"batch {batch_size}: {json.dumps(row)}", flush=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "batches"}), flush=True)


if __name__ == "__main__":
    main()
