"""Cost of monitoring four detectors during generation (issue floor: <= 1.05x).

Times 64-token greedy generation on the default model, batch 1: unmonitored, and with
four detectors (harmful requests, honesty, sentiment, refusal; six layers in all)
recording per-token scores through `acteng.monitor`, interleaved over rounds; reports
median ratios. Also times the guard watching one detector mid-generation.

    .venv/bin/python bench/monitor_overhead.py [--rounds 7] [--tokens 64]
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack

import acteng
from _common import greedy_run, interleaved, median, save
from acteng.detectors import train_detector
from acteng.guard import Guard, guarded_generate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model = acteng.load_model()
    detectors = [
        train_detector(model, "harmful_requests", layers=[12, 14]),
        train_detector(model, "honesty", layers=[16, 18], region="response"),
        train_detector(model, "sentiment", layers=[10], region="response"),
        train_detector(model, "refusal", layers=[20], region="response"),
    ]
    prompt = "Tell me about your weekend."
    run = greedy_run(model, prompt, args.tokens)

    def monitored() -> None:
        with ExitStack() as stack:
            monitors = [stack.enter_context(acteng.monitor(model, d)) for d in detectors]
            run()
        assert all(len(m.aggregate(0)) >= args.tokens for m in monitors)

    watch = Guard(detectors[0], policy="flag", check="generation", threshold=1e9)

    def guarded() -> None:
        # check="generation": no extra prompt pass, only the running score while decoding
        guarded_generate(model, [prompt], watch, max_new_tokens=args.tokens)

    def plain_generate() -> None:
        acteng.generate(model, [prompt], max_new_tokens=args.tokens)

    run()  # warm-up
    conditions = {
        "unmonitored": run,
        "four_detectors": monitored,
        "generate": plain_generate,
        "guard_watching_generation": guarded,
    }
    times = interleaved(conditions, args.rounds)
    base = {"four_detectors": "unmonitored", "guard_watching_generation": "generate"}
    report = {}
    for name, t in times.items():
        ref = median(times[base.get(name, name)])
        report[name] = {
            "median_s": round(median(t), 4),
            "tok_per_s": round(args.tokens / median(t), 1),
            "ratio": round(median(t) / ref, 4),
        }
        print(
            f"{name:<27} {median(t):.3f} s  {args.tokens / median(t):6.1f} tok/s  "
            f"{report[name]['ratio']:.3f}x"
        )
    path = save(
        "monitor_overhead", {"tokens": args.tokens, "rounds": args.rounds, "report": report}
    )
    print(f"floor: four detectors <= 1.05x unmonitored; written to {path}")


if __name__ == "__main__":
    main()
