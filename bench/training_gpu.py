"""What circuit-breaker and RMU training cost on a GPU for an 8B model.

Issue 20 asks what the trainers cost beyond the default model. This builds a
random-weight model with Llama-3-8B's shape in bf16 (as `compiled_gpu.py` does: no
weights travel), gives it the default model's tokenizer (saved once to a folder, a few
MB), and runs acteng's own trainers with their defaults on the bundled data:

- `train_circuit_breaker`: the model's answers to 256 harmful and 256 harmless train
  requests (32 greedy tokens each), then 150 LoRA steps at the depth-scaled target layers,
- `train_rmu` on the bundled cooking corpus: 200 steps on three MLP output projections.

It reports each run's wall time, the time until its first step is done
(``before_first_step_s``: answers, encoding, the frozen model's statistics, and that
step), the median seconds a step (checkpoint saves fall outside the median), and the peak
GPU memory. Random weights make the losses meaningless; the cost
of a step depends only on the shapes and the token counts, which are the real ones (the
requests are tokenised as the default model's tokenizer does, and a random model's
answers run to the full 32 tokens, as a complying model's do).

    .venv/bin/python bench/training_gpu.py --save-tokenizer   # here, once (default model)
    PYTHONPATH=src python3 bench/training_gpu.py             # CUDA machine; carry
                                                             # bench/results/tokenizer
    .venv/bin/python bench/training_gpu.py --shape tiny --device cpu --steps 4   # smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import acteng
from acteng.training import train_circuit_breaker, train_rmu
from compiled_gpu import SHAPES, add_dtype_argument, build, chosen_dtype

RESULTS = Path(__file__).parent / "results"
TOKENIZER = RESULTS / "tokenizer"


def save_tokenizer(folder: Path) -> None:
    """The default model's tokenizer files (its chat template included), no weights."""
    model = acteng.load_model()
    model.tokenizer.save_pretrained(str(folder))
    print(f"saved the default model's tokenizer to {folder}", flush=True)


def timed_run(
    name: str, train: Callable[[Callable[[int, dict[str, float]], None]], Any], device: str
) -> dict[str, Any]:
    """Run `train(on_step)`; the wall time, the time until the first step is done, the
    seconds between steps."""
    marks: list[float] = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def on_step(step: int, record: dict[str, float]) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    start = time.perf_counter()
    result = train(on_step)
    wall = time.perf_counter() - start
    steps = [b - a for a, b in itertools.pairwise(marks)]
    row = {
        "steps": result.steps,
        "wall_s": round(wall, 1),
        "before_first_step_s": round(marks[0] - start, 1) if marks else None,
        "median_step_s": round(statistics.median(steps), 4) if steps else None,
        "slowest_step_s": round(max(steps), 3) if steps else None,
        "after_last_step_s": round(start + wall - marks[-1], 1) if marks else None,
        "peak_gpu_memory_gb": (
            round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None
        ),
        "last_losses": result.losses[-1] if result.losses else None,
    }
    print(f"{name}: {json.dumps(row)}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    add_dtype_argument(parser)
    parser.add_argument("--tokenizer", default=str(TOKENIZER))
    parser.add_argument("--steps", type=int, default=None, help="default: each trainer's own")
    parser.add_argument("--only", choices=["circuit_breaker", "rmu"], default=None)
    parser.add_argument("--save-tokenizer", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "training_gpu.json"))
    args = parser.parse_args()
    if args.save_tokenizer:
        save_tokenizer(Path(args.tokenizer))
        return
    if not Path(args.tokenizer, "tokenizer_config.json").is_file():
        raise SystemExit(
            f"no tokenizer in {args.tokenizer}: run `bench/training_gpu.py --save-tokenizer` "
            "where the default model is installed, and carry that folder"
        )
    from transformers import AutoTokenizer

    # the answers' cache must not hand one random model's answers to another
    os.environ["ACTENG_CACHE"] = tempfile.mkdtemp(prefix="acteng-training-gpu-")
    dtype = chosen_dtype(args)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    start = time.perf_counter()
    model = build(args.shape, args.device, dtype, tokenizer)
    build_s = time.perf_counter() - start
    steps = {} if args.steps is None else {"steps": args.steps}
    result: dict[str, Any] = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
        "dtype": str(dtype),
        "parameters_b": round(sum(p.numel() for p in model.hf.parameters()) / 1e9, 2),
        "build_s": round(build_s, 1),
    }
    print(json.dumps(result), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="acteng-training-gpu-out-"))
    runs: dict[str, Callable[[Callable[[int, dict[str, float]], None]], Any]] = {
        "circuit_breaker": lambda on_step: train_circuit_breaker(
            model, work / "cb", on_step=on_step, **steps
        ),
        "rmu": lambda on_step: train_rmu(model, "cooking", work / "rmu", on_step=on_step, **steps),
    }
    for name, train in runs.items():
        if args.only in (None, name):
            result[name] = timed_run(name, train, args.device)
            out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
