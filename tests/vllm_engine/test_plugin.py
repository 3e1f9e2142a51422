"""acteng's vLLM plugin on the default model in vLLM's compiled mode, float32.

The graph is Dynamo's trace, run by its eager backend on CPU (support.py says why;
test_compile_cache runs the Inductor path). One engine for the module. References come from
the transformers engine: `acteng.steer` around ``model.hf.generate``, greedy.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest
import torch

import acteng
from tests.vllm_engine.support import (
    VLLM_WARNINGS,
    assert_hooked_and_compiled,
    greedy,
    make_llm,
    needs_vllm,
    token_ids,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.real, needs_vllm, *VLLM_WARNINGS]

PROMPTS = [
    "Tell me about your weekend.",
    "What should I cook tonight?",
    "Describe the ocean in one sentence.",
    "Why do cats purr?",
]


def chat_ids(model: acteng.Model, text: str) -> list[int]:
    """Prompt tokens exactly as ``acteng serve`` makes them for a chat request."""
    rendered = model.render_chat([{"role": "user", "content": text}])
    return list(model.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def reference(
    model: acteng.Model, ids: list[int], spec: acteng.SteeringSpec | None, n: int
) -> list[int]:
    """Greedy tokens from the transformers engine, up to and including end of text."""
    context = acteng.steer(model, spec) if spec is not None else nullcontext()
    with torch.no_grad(), context:
        out = model.hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    return [int(t) for t in out[0, len(ids) :]]


def vector(name: str) -> acteng.SteeringVector:
    from acteng.bundled import bundled_files

    return acteng.SteeringVector.load(bundled_files()[name])


@pytest.fixture(scope="module")
def llm(smollm2: acteng.Model) -> Any:
    from acteng.vllm_engine.engine import model_location

    engine = make_llm(model_location(smollm2))
    yield engine
    engine.llm_engine.engine_core.shutdown()


def test_pinned_internals_and_hooks_before_compilation(llm: Any) -> None:
    from acteng.vllm_engine.plugin import CACHE_FACTOR_KEY, check_internals

    check_internals()  # version and wrapped methods
    runner = assert_hooked_and_compiled(llm, layers=30)  # every decoder layer of SmolLM2
    # what the per-step update reads from the runner
    assert isinstance(runner.input_batch.req_ids, list)
    assert hasattr(runner.query_start_loc, "np")
    assert isinstance(runner.requests, dict)
    assert runner.max_num_tokens > 0
    assert runner.vllm_config.additional_config[CACHE_FACTOR_KEY].startswith("v")


@pytest.mark.parametrize(
    ("name", "coefficient", "mode"),
    [
        ("honesty", -16.0, "add"),  # a unit direction at layer 16
        ("honesty", -12.0, "add"),
        ("honesty", 12.0, "add"),
        ("honesty", 16.0, "add"),
        ("refusal", 1.0, "ablate"),
    ],
)
def test_compiled_steering_matches_transformers(
    llm: Any, smollm2: acteng.Model, name: str, coefficient: float, mode: str
) -> None:
    ids = chat_ids(smollm2, PROMPTS[0])
    spec = acteng.SteeringSpec(vector(name), coefficient, mode=mode)
    steering = [{"vector": name, "coefficient": coefficient, "mode": mode}]
    [got] = token_ids(llm, [ids], greedy(24, steering))
    [plain] = token_ids(llm, [ids], greedy(24))
    assert got == reference(smollm2, ids, spec, 24)
    if mode == "add":  # steering is active in the compiled graph, not silently dropped
        assert got != plain


def test_unsteered_plain_run_matches_transformers(llm: Any, smollm2: acteng.Model) -> None:
    ids = chat_ids(smollm2, PROMPTS[1])
    assert token_ids(llm, [ids], greedy(24)) == [reference(smollm2, ids, None, 24)]


def test_mixed_batch_matches_solo_runs(llm: Any, smollm2: acteng.Model) -> None:
    prompts = [chat_ids(smollm2, p) for p in PROMPTS]
    params = [
        greedy(24, [{"vector": "honesty", "coefficient": 12.0}]),
        greedy(24),
        greedy(24, [{"vector": "refusal", "coefficient": 0.1, "layers": [10]}]),
        greedy(24),
    ]
    together = token_ids(llm, prompts, params)
    alone = [token_ids(llm, [p], q)[0] for p, q in zip(prompts, params, strict=True)]
    assert together == alone
    assert together[0] != token_ids(llm, [prompts[0]], greedy(24))[0]


def test_positions_generated_leave_the_prompt_alone(llm: Any, smollm2: acteng.Model) -> None:
    ids = chat_ids(smollm2, PROMPTS[2])
    spec = acteng.SteeringSpec(vector("honesty"), 16.0, positions="generated")
    item = {"vector": "honesty", "coefficient": 16.0, "positions": "generated"}
    [got] = token_ids(llm, [ids], greedy(16, [item]))
    assert got == reference(smollm2, ids, spec, 16)


def test_prefix_cache_never_mixes_steering_settings(llm: Any, smollm2: acteng.Model) -> None:
    notes = " ".join(f"Note {i}: the quick brown fox jumps over the lazy dog." for i in range(60))
    ids = chat_ids(smollm2, f"{notes}\nIgnore the notes. Tell me about your weekend.")
    assert len(ids) > 700  # a long shared prefix: many full cache blocks
    steering = [
        {"vector": "honesty", "coefficient": 16.0},
        {"vector": "refusal", "coefficient": 0.2},
    ]

    def run(params: Any, salt: str | None = None) -> tuple[list[int], int]:
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if salt is not None:
            prompt["cache_salt"] = salt
        [out] = llm.generate([prompt], params, use_tqdm=False)
        return list(out.outputs[0].token_ids), int(out.num_cached_tokens or 0)

    steered, _ = run(greedy(12, steering))  # fills the cache with steered blocks
    after, cached = run(greedy(12))  # same prefix, unsteered
    fresh, _ = run(greedy(12), salt="a-salt-no-other-request-uses")  # computed from scratch
    assert cached == 0  # no block of the steered run was reused
    assert after == fresh
    assert steered != fresh
    again, cached = run(greedy(12))
    assert cached > 0 and again == fresh  # the cache itself is on
    steered_again, cached = run(greedy(12, steering))
    assert cached > 0 and steered_again == steered


def test_bad_steering_is_refused_and_the_engine_keeps_serving(
    llm: Any, smollm2: acteng.Model
) -> None:
    ids = chat_ids(smollm2, PROMPTS[3])
    bad = [
        ([{"vector": "no-such-vector"}], "no vector or detector named 'no-such-vector'"),
        ([{"vector": "honesty", "coefficient": 1e9}], "coefficient"),
        ([{"vector": "honesty", "layers": [30]}], "out of range"),
        ([{"vector": "honesty", "mode": "sideways"}], "mode"),
        ('[{"vector": ', "not JSON"),
    ]
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    for steering, message in bad:
        params = SamplingParams(max_tokens=4, extra_args={"steering": steering})
        with pytest.raises(VLLMValidationError, match=message):
            llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    # vllm_xargs style: the list as a JSON string works too
    as_text = greedy(8)
    as_text.extra_args = {"steering": '[{"vector": "honesty", "coefficient": 8}]'}
    assert token_ids(llm, [ids], as_text) == token_ids(
        llm, [ids], greedy(8, [{"vector": "honesty", "coefficient": 8}])
    )
