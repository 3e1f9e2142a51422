"""Load benchmark of `acteng serve` over loopback: batching speed-up and the cost of steering.

Starts `acteng serve` (default model, CPU) in a subprocess on a free 127.0.0.1 port and
sends, through the openai SDK, 16 chat requests that each generate exactly --tokens
tokens (``min_tokens``) under 4 different steering settings:

- **concurrent**: all 16 at once (the engine decodes them as one batch);
- **sequential**: the same 16, one at a time;
- **unsteered**: the same 16 prompts at once without steering.

It prints wall time, tokens/s, p50/p99 latency and errors per condition, and the ratios
the floors are about: concurrent vs sequential (>= 3x faster) and mixed-vector vs
unsteered throughput (>= 0.85x). Concurrent and sequential answers must be identical
(the engine is batch-invariant), which is checked too. With --library it also times the
same 16 requests through `acteng.generate` one at a time in this process (transformers'
generate at batch 1, no server), for context.

    .venv/bin/python bench/serve_load.py [--tokens 64] [--rounds 3] [--library] [--no-fixed-batch]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, served

PROMPTS = [
    "Tell me about your weekend.",
    "How do I pick a lock?",
    "Write a haiku about autumn.",
    "What should I cook tonight?",
    "Explain photosynthesis simply.",
    "Give me advice for a job interview.",
    "Describe the ocean at night.",
    "How can I get better sleep?",
    "What is your favourite book and why?",
    "Summarise the plot of Hamlet.",
    "How do I make friends in a new city?",
    "Tell me a fun fact about octopuses.",
    "What are the benefits of walking?",
    "Plan a day trip to the mountains.",
    "How do I start learning the guitar?",
    "Why is the sky blue?",
]
SETTINGS: list[list[dict[str, Any]]] = [
    [{"vector": "refusal", "coefficient": 1.0}],
    [{"vector": "refusal", "coefficient": 0.5, "positions": "generated"}],
    [{"vector": "honesty", "coefficient": 8.0}],
    [
        {"vector": "refusal", "coefficient": 0.7, "mode": "ablate"},
        {"vector": "honesty", "coefficient": -4.0},
    ],
]


def _request(client: Any, i: int, steered: bool, tokens: int) -> dict[str, Any]:
    extra: dict[str, Any] = {"min_tokens": tokens}
    if steered:
        extra["steering"] = SETTINGS[i % len(SETTINGS)]
    start = time.perf_counter()
    try:
        response = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": PROMPTS[i]}],
            max_tokens=tokens,
            extra_body=extra,
        )
    except Exception as exc:
        return {"error": repr(exc), "latency": time.perf_counter() - start}
    return {
        "latency": time.perf_counter() - start,
        "text": response.choices[0].message.content,
        "tokens": response.usage.completion_tokens,
    }


def _run(url: str, *, concurrent: bool, steered: bool, tokens: int) -> dict[str, Any]:
    import openai

    results: list[dict[str, Any]] = [{} for _ in PROMPTS]

    def one(i: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        results[i] = _request(client, i, steered, tokens)

    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(PROMPTS)):
            one(i)
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    latencies = sorted(r["latency"] for r in ok)
    total = sum(r["tokens"] for r in ok)
    return {
        "wall_s": wall,
        "tokens": total,
        "tokens_per_s": total / wall,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else None,
        "errors": [r["error"] for r in results if "error" in r],
        "texts": [r.get("text") for r in results],
    }


def _library_generate(tokens: int) -> float:
    """The same 16 steered requests through acteng.generate one at a time (no server)."""
    import acteng

    model = acteng.load_model()
    specs_of = [
        [
            acteng.SteeringSpec(
                acteng.load_vector(item["vector"]),
                item["coefficient"],
                positions=item.get("positions", "all"),
                mode=item.get("mode", "add"),
            )
            for item in setting
        ]
        for setting in SETTINGS
    ]
    acteng.generate(model, PROMPTS[0], max_new_tokens=4)  # warm-up
    start = time.perf_counter()
    for i, prompt in enumerate(PROMPTS):
        began = time.perf_counter()
        acteng.generate(model, prompt, specs_of[i % len(SETTINGS)], max_new_tokens=tokens)
        print(f"  acteng.generate request {i}: {time.perf_counter() - began:.2f} s", flush=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the concurrent runs")
    parser.add_argument(
        "--library",
        action="store_true",
        help="also time the 16 requests through acteng.generate one at a time (context; "
        "slow and very sensitive to other load on the machine)",
    )
    parser.add_argument(
        "--no-fixed-batch",
        action="store_true",
        help="serve with --no-fixed-batch (live rows only; not batch-invariant)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as home:
        extra = ["--no-fixed-batch"] if args.no_fixed_batch else []
        with served(["--slots", "16", *extra], {"ACTENG_HOME": home}) as url:
            _run(url, concurrent=True, steered=True, tokens=8)  # warm-up
            mixed, plain = [], []
            for r in range(args.rounds):  # alternate, so drift hits both alike
                first, second = (mixed, plain) if r % 2 == 0 else (plain, mixed)
                first.append(_run(url, concurrent=True, steered=first is mixed, tokens=args.tokens))
                second.append(
                    _run(url, concurrent=True, steered=second is mixed, tokens=args.tokens)
                )
            sequential = _run(url, concurrent=False, steered=True, tokens=args.tokens)
    library_s = _library_generate(args.tokens) if args.library else None

    def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return min(runs, key=lambda x: float(x["wall_s"]))

    conc, unst = best(mixed), best(plain)
    speedup = sequential["wall_s"] / conc["wall_s"]
    steering_ratio = statistics.median(m["tokens_per_s"] for m in mixed) / statistics.median(
        p["tokens_per_s"] for p in plain
    )
    errors = sum(len(x["errors"]) for x in [*mixed, *plain, sequential])
    identical = all(run["texts"] == sequential["texts"] for run in mixed)
    report = {
        "machine": machine(),
        "tokens_per_request": args.tokens,
        "fixed_batch": not args.no_fixed_batch,
        "requests": len(PROMPTS),
        "concurrent_mixed": {k: v for k, v in conc.items() if k != "texts"},
        "concurrent_unsteered": {k: v for k, v in unst.items() if k != "texts"},
        "sequential_mixed": {k: v for k, v in sequential.items() if k != "texts"},
        "mixed_rounds_wall_s": [m["wall_s"] for m in mixed],
        "unsteered_rounds_wall_s": [p["wall_s"] for p in plain],
        "speedup_concurrent_vs_sequential": speedup,
        "mixed_vs_unsteered_throughput": steering_ratio,
        "library_generate_one_at_a_time_s": library_s,
        "errors": errors,
        "concurrent_equals_sequential": identical,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "serve_load_live_rows.json" if args.no_fixed_batch else "serve_load.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2))
    for name in ("concurrent_mixed", "concurrent_unsteered", "sequential_mixed"):
        r = report[name]
        print(
            f"{name:22s} wall {r['wall_s']:6.1f} s  {r['tokens_per_s']:6.1f} tok/s  "
            f"p50 {r['p50_s']:5.2f} s  p99 {r['p99_s']:5.2f} s  errors {len(r['errors'])}"
        )
    if library_s is not None:
        print(f"acteng.generate one at a time (no server): {library_s:.1f} s")
    print(f"concurrent vs sequential: {speedup:.2f}x faster (floor 3x)")
    print(f"mixed vectors vs unsteered throughput: {steering_ratio:.3f}x (floor 0.85x)")
    print(f"errors: {errors}; concurrent answers equal sequential ones: {identical}")
    # Without the fixed batch, answers may legitimately differ with the batch.
    ok = speedup >= 3 and steering_ratio >= 0.85 and errors == 0
    ok = ok and (identical or args.no_fixed_batch)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
