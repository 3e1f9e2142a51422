"""Extraction throughput on Ray (1 and 2 workers) vs the local backend, with the per-worker
overhead (cluster start, actor start + model load, transfer of the rows) and the equality
of every method's vectors; the figures the "Scale out" guide projects N workers from.

    .venv/bin/python bench/ray_scale.py [--pairs 120] [--rounds 2]

One local Ray cluster sized to this machine is started once. Each worker runs torch with
one thread, and so does the local reference for the equality check; the local backend is
timed with the machine's default threads (what a user gets without Ray) and with one
thread. Conditions are interleaved, rotating the order each round.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from typing import Any

import torch

import acteng
from _common import interleaved, save, workload_pairs
from acteng.extraction import extract_many
from acteng.layer_selection import parse_layers
from acteng.pairs import ContrastivePair, Pairs


def _pairs(n: int) -> Pairs:
    rows = workload_pairs(n)
    return Pairs(tuple(ContrastivePair(p, a, b) for p, a, b in rows), name=f"workload{n}")


def _load_once(recipe: Any, expected_hash: str) -> float:
    """Runs in a Ray task: the model load alone."""
    from acteng.backends.ray import load_on_worker

    start = time.perf_counter()
    load_on_worker(recipe, expected_hash, 1)
    return time.perf_counter() - start


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", default="all")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import numpy as np
    import ray

    from acteng.backends.ray import LOCAL_OBJECT_STORE_BYTES, portable_recipe

    model = acteng.load_model()
    data = _pairs(args.pairs)
    texts = 2 * len(data)
    layers = parse_layers(model, args.layers)
    default_threads = torch.get_num_threads()

    start_s, _ = _timed(
        lambda: ray.init(
            num_cpus=os.cpu_count(),
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    )
    try:
        # Overhead of one worker: actor start-up plus model load, and model load alone.
        recipe = portable_recipe(model)
        loader = ray.remote(num_cpus=1)(_load_once)
        actor_total_s, load_s = _timed(lambda: ray.get(loader.remote(recipe, model.content_hash)))
        # Transfer: the rows of one recording (what the workers send back), through the
        # object store.
        rows = np.zeros((texts, len(layers), model.hidden_size), dtype=np.float32)
        put_s, _ = _timed(lambda: ray.get(ray.put(rows)))

        def local(threads: int) -> None:
            torch.set_num_threads(threads)
            try:
                acteng.extract(model, data, layers=layers)
            finally:
                torch.set_num_threads(default_threads)

        def on_ray(workers: int) -> None:
            acteng.extract(model, data, layers=layers, backend=acteng.RayBackend(workers=workers))

        runs = interleaved(
            {
                "local": lambda: local(default_threads),
                "local_1_thread": lambda: local(1),
                "ray_1": lambda: on_ray(1),
                "ray_2": lambda: on_ray(2),
            },
            args.rounds,
        )

        # Equality with one thread on both sides, every method (actadd on one pair).
        torch.set_num_threads(1)
        methods = ["mean_diff", "pca", "probe"]
        here = extract_many(model, data, methods, layers)
        there = extract_many(model, data, methods, layers, backend="ray")
        one = Pairs(data.items[:1], name="one")
        here["actadd"] = acteng.extract(model, one, "actadd", layers)
        there["actadd"] = acteng.extract(model, one, "actadd", layers, backend="ray")
        torch.set_num_threads(default_threads)
        diffs = {
            m: max(
                float((here[m].directions[x] - there[m].directions[x]).abs().max()) for x in layers
            )
            for m in here
        }
    finally:
        ray.shutdown()

    median = {k: statistics.median(v) for k, v in runs.items()}
    # Per-worker steady rate from the 1-worker run with its fixed costs taken out.
    fixed = actor_total_s + put_s
    rate_1 = texts / max(median["ray_1"] - fixed, 1e-9)
    projection = {
        str(n): round(texts / (fixed + texts / (n * rate_1)), 2) for n in (1, 2, 4, 8, 16)
    }
    payload = {
        "pairs": len(data),
        "texts": texts,
        "layers": len(layers),
        "rounds": args.rounds,
        "local_threads": default_threads,
        "seconds": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "median_seconds": {k: round(v, 3) for k, v in median.items()},
        "texts_per_second": {k: round(texts / v, 2) for k, v in median.items()},
        "overhead_seconds": {
            "cluster_start": round(start_s, 3),
            "actor_start_and_model_load": round(actor_total_s, 3),
            "model_load": round(load_s, 3),
            "rows_transfer": round(put_s, 3),
            "rows_megabytes": round(rows.nbytes / 1e6, 1),
        },
        "per_worker_texts_per_second": round(rate_1, 2),
        "projected_texts_per_second": projection,
        "max_abs_diff_vs_local": diffs,
    }
    path = save("ray_scale", payload)
    for key, value in payload.items():
        print(f"{key}: {value}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
