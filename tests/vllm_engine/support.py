"""Helpers for the vLLM tests: skip without vLLM, build one engine, reach into its worker.

The vLLM tests run in the environment ``scripts/setup-vllm`` makes (``.venv-vllm``); in
any other environment they are skipped. vLLM starts in-process (one process, no engine-core
or worker subprocess) so the tests can look at the model runner.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest
import torch

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vLLM is not installed: run scripts/setup-vllm and use .venv-vllm"
)

# vLLM and the torch parts it imports raise deprecation warnings of their own (torch.jit,
# torch.distributed.reduce_op); the suite turns warnings into errors, so these modules let
# those two kinds through.
VLLM_WARNINGS = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

# One process: the tests inspect the worker and compare engines side by side.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ENGINE_ARGS: dict[str, Any] = {
    "dtype": "float32",  # vLLM's bf16 CPU kernels are not batch-invariant
    "max_model_len": 1024,
    "max_num_seqs": 8,
    "seed": 0,
    "kv_cache_memory_bytes": 1 << 30,
    "gpu_memory_utilization": 0.3,
    "disable_log_stats": True,
}


class PairLayer(torch.nn.Module):
    """A stand-in for a vLLM decoder layer (no vLLM needed): it takes the token positions
    first and returns ``(hidden, residual)``, here as given, so a hook's change shows."""

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden, residual


def make_llm(model_dir: str, **overrides: Any) -> Any:
    from vllm import LLM

    return LLM(model=model_dir, **{**ENGINE_ARGS, **overrides})


def runner_of(llm: Any) -> Any:
    """The in-process model runner of an offline `LLM` (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner


def assert_hooked_and_compiled(llm: Any, layers: int) -> Any:
    """Assert the plugin hooked all `layers` decoder layers of an engine in vLLM's compiled
    mode (not eager), so steering is shown inside the compiled graph; returns the runner."""
    from vllm.config import CompilationMode

    runner = runner_of(llm)
    assert len(runner._acteng_steering.handles) == layers
    config = runner.vllm_config
    assert not config.model_config.enforce_eager
    assert config.compilation_config.mode != CompilationMode.NONE
    return runner


def greedy(max_tokens: int = 24, steering: list[dict[str, Any]] | None = None, **kw: Any) -> Any:
    from vllm import SamplingParams

    extra = {"steering": steering} if steering else None
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra, **kw)


def token_ids(llm: Any, prompts: list[list[int]], params: Any) -> list[list[int]]:
    many = params if isinstance(params, list) else [params] * len(prompts)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], many, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]
