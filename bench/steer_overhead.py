"""Steering overhead on greedy generation (issue floor: <= 1.03x one layer, <= 1.06x all).

Times 64-token greedy generation on the default model, batch 1, unsteered vs steered at
one layer vs steered at all 30 layers, interleaved over rounds; reports median ratios.

    .venv/bin/python bench/steer_overhead.py [--rounds 7] [--tokens 64]
"""

from __future__ import annotations

import argparse

import acteng
from _common import greedy_run, interleaved, median, save


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model = acteng.load_model()
    vector = acteng.extract(model, "sentiment", layers="all")
    run = greedy_run(model, "Tell me about your weekend.", args.tokens)

    def steered(layers: list[int]) -> None:
        with acteng.steer(model, vector, coefficient=2.0, layers=layers):
            run()

    run()  # warm-up
    conditions = {
        "unsteered": run,
        "one_layer": lambda: steered([8]),
        "all_layers": lambda: steered(list(range(model.num_layers))),
        "all_layers_generated_only": lambda: steered_positions("generated"),
    }

    def steered_positions(positions: str) -> None:
        with acteng.steer(model, vector, coefficient=2.0, positions=positions):
            run()

    times = interleaved(conditions, args.rounds)
    base = median(times["unsteered"])
    report = {
        name: {
            "median_s": round(median(t), 4),
            "tok_per_s": round(args.tokens / median(t), 1),
            "ratio": round(median(t) / base, 4),
        }
        for name, t in times.items()
    }
    for name, row in report.items():
        print(
            f"{name:<27} {row['median_s']:.3f} s  "
            f"{row['tok_per_s']:6.1f} tok/s  {row['ratio']:.3f}x"
        )
    path = save("steer_overhead", {"tokens": args.tokens, "rounds": args.rounds, "report": report})
    print(f"floors: one layer <= 1.03x, all layers <= 1.06x; written to {path}")


if __name__ == "__main__":
    main()
