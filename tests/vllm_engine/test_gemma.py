"""The plugin on a second family: Gemma-3-270M (real weights), against the transformers engine.

Gemma-3's vLLM decoder layer normalises its MLP output before returning
``(hidden_states, residual)``; their sum is still the residual stream, which is what this
checks (steered greedy tokens equal transformers' ``hidden_states[i + 1] + c v``). The
engine runs in vLLM's compiled mode (the Dynamo-traced graph; see support.py for the
backend), as on Llama, so the hooks are shown to be traced into a second family's graph.
The direction is random (fixed seed), stored in a temporary vector library that vLLM
resolves by name through ``$ACTENG_HOME``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
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

LAYERS = (4, 8)


@pytest.fixture(scope="module")
def home(gemma3: acteng.Model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from acteng.library import VectorLibrary

    folder = tmp_path_factory.mktemp("gemma-library")
    generator = torch.Generator().manual_seed(0)
    directions = {layer: torch.randn(gemma3.hidden_size, generator=generator) for layer in LAYERS}
    directions = {k: v / v.norm() for k, v in directions.items()}
    VectorLibrary(folder).add(
        "gemma-random", acteng.SteeringVector(directions, {"model": gemma3.identity()})
    )
    before = os.environ.get("ACTENG_HOME")
    os.environ["ACTENG_HOME"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("ACTENG_HOME", None)
    else:
        os.environ["ACTENG_HOME"] = before


@pytest.fixture(scope="module")
def llm(gemma3: acteng.Model, home: Path) -> Iterator[Any]:
    from acteng.vllm_engine.engine import model_location

    engine = make_llm(model_location(gemma3), max_model_len=512)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def reference(model: acteng.Model, ids: list[int], spec: acteng.SteeringSpec | None) -> list[int]:
    context = acteng.steer(model, spec) if spec is not None else nullcontext()
    with torch.no_grad(), context:
        out = model.hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    return [int(t) for t in out[0, len(ids) :]]


@pytest.mark.parametrize(
    ("coefficient", "mode"), [(-60.0, "add"), (60.0, "add"), (120.0, "add"), (1.0, "ablate")]
)
def test_gemma3_steering_matches_transformers(
    llm: Any, gemma3: acteng.Model, home: Path, coefficient: float, mode: str
) -> None:
    from acteng.library import VectorLibrary

    ids = list(gemma3.tokenizer("My favourite season is")["input_ids"])
    vector = VectorLibrary(home).load("gemma-random")
    spec = acteng.SteeringSpec(vector, coefficient, mode=mode)
    steering = [{"vector": "gemma-random", "coefficient": coefficient, "mode": mode}]
    [got] = token_ids(llm, [ids], greedy(16, steering))
    assert got == reference(gemma3, ids, spec)
    if coefficient == 120.0:
        assert got != token_ids(llm, [ids], greedy(16))[0]


def test_gemma3_runs_compiled_with_every_layer_hooked(llm: Any, gemma3: acteng.Model) -> None:
    assert_hooked_and_compiled(llm, layers=gemma3.num_layers)


def test_gemma3_unsteered_row_in_a_mixed_batch(llm: Any, gemma3: acteng.Model) -> None:
    ids = list(gemma3.tokenizer("The weather today")["input_ids"])
    params = [greedy(16, [{"vector": "gemma-random", "coefficient": 120.0}]), greedy(16)]
    together = token_ids(llm, [ids, ids], params)
    assert together[1] == token_ids(llm, [ids], greedy(16))[0] == reference(gemma3, ids, None)
