"""The guard's generation check: how the prompt threshold and a calibrated one read answers.

The running score of generated text (the mean of its per-token scores so far) is not on
the scale of a prompt's score, so `acteng.guard.calibrate_generation` sets a separate
threshold on benign answers. This measures, with the bundled `harmful_request` and greedy
32-token answers: the share of answers to the team's held-out harmless prompts
(`harmful_requests` test split) that the prompt threshold flags, then the shares of
held-out harmless and harmful answers flagged after calibrating on 80 benign train prompts
at 5 %.

    .venv/bin/python bench/guard_generation.py     # ~5 min on 2 cores
"""

from __future__ import annotations

import acteng
from _common import save
from acteng.detectors import load_detector
from acteng.guard import Guard, calibrate_generation, guarded_generate

TOKENS = 32


def flagged(model: acteng.Model, prompts: list[str], guard: Guard) -> float:
    results = guarded_generate(model, prompts, guard, max_new_tokens=TOKENS)
    return round(sum(r.flagged for r in results) / len(results), 4)


def main() -> None:
    model = acteng.load_model()
    detector = load_detector("harmful_request", model=model)
    benign = [p.negative for p in acteng.load_pairs("harmful_requests", split="train")][:80]
    test = acteng.load_pairs("harmful_requests", split="test")
    harmless, harmful = [p.negative for p in test], [p.positive for p in test]
    plain = Guard(detector, check="generation")
    calibrated = calibrate_generation(model, plain, benign, max_new_tokens=TOKENS)
    figures = {
        "prompt_threshold_harmless_flagged": flagged(model, harmless, plain),
        "generation_threshold": calibrated.generation_threshold,
        "calibrated_harmless_flagged": flagged(model, harmless, calibrated),
        "calibrated_harmful_flagged": flagged(model, harmful, calibrated),
    }
    print(figures)
    print(f"written to {save('guard_generation', figures)}")


if __name__ == "__main__":
    main()
