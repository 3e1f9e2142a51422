"""Compiled decoding with steering traced into the graph (the GPU fast path).

On a GPU, eager decoding of a small batch is bound by Python and kernel launches, not by
the hardware. transformers can decode with a static KV cache and a ``torch.compile``d
step (CUDA graphs by default); forward hooks on the decoder blocks are traced into that
graph. Tracing captures the hooks' *structure*: add or remove a hook, branch in Python on
a vector, or reallocate a buffer, and the next step recompiles (seconds to minutes).

So `CompiledSteering` attaches one hook per block, once, for the life of the model, and
never changes them. Each hook reads a `SteeringTable` (fixed buffers of terms per
(layer, term, slot); batch row i reads slot i + 1); steering a request means writing
those buffers in place. A `StepShape` of plain Python values picks the traced code: how
many terms per layer (0 when no row is steered: exactly the plain model's graph) and
whether any term needs the full formula (a mode that projects, such as ablate or clamp,
or a term limited to some positions; plain additions skip the projection and the
per-token gate). Each
shape is compiled once per batch size; changing vectors, coefficients, modes within a
shape, positions or which rows are steered never recompiles (tests assert it with
torch._dynamo's counters). Unused terms of a row hold zeros.

The static cache is sized in buckets of `CACHE_BUCKET` tokens (and only grows), so prompts
of different lengths reuse one compiled step.

>>> compiled = acteng.steering.compiled.for_model(model)          # CUDA + bf16: the default path
>>> ids = compiled.generate_ids(batch, [[spec], []], max_new_tokens=64)  # row 1 unsteered
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from acteng.errors import ConfigError
from acteng.hooks import HookHandle, attach
from acteng.models import Model
from acteng.steering.spec import SteeringSpec
from acteng.steering.table import SteeringTable, StepShape

if TYPE_CHECKING:
    from transformers import GenerationMixin

__all__ = [
    "CACHE_BUCKET",
    "CompiledSteering",
    "allow_graphs",
    "for_model",
    "release",
    "wants_compiled",
]

CACHE_BUCKET = 256
_HALF = (torch.bfloat16, torch.float16)
# One CompiledSteering per loaded model (its hooks must stay attached and unchanged), kept
# on the transformers model itself so it lives and dies with it.
_ATTRIBUTE = "_acteng_compiled_steering"


def wants_compiled(model: Model) -> bool:
    """Whether `generate` takes the compiled path by default for `model`.

    Yes on CUDA in bf16/fp16 (where compiled decoding pays); no on CPU, where compiling
    costs more than it saves for one-off calls. ``ACTENG_COMPILE=1`` / ``0`` overrides.
    """
    forced = os.environ.get("ACTENG_COMPILE", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return model.device.type == "cuda" and model.dtype in _HALF


def allow_graphs(count: int) -> None:
    """Let dynamo keep at least `count` graphs of one function before it gives up on it.

    Each step shape is one graph by design (see `StepShape`); past dynamo's default
    limit it would silently fall back to eager code. Recent torch keeps dynamo's settings
    per thread, so call this in the thread that compiles.
    """
    config = torch._dynamo.config
    if hasattr(config, "recompile_limit"):
        config.recompile_limit = max(config.recompile_limit, count)


class CompiledSteering:
    """Per-row steering for a compiled, static-cache decoding step; see the module doc.

    `max_batch` bounds the rows of one call; `terms` the steering terms a row may put on
    one layer (each costs a few fused element-wise operations per layer and step, whether
    used or not). `backend` and `mode` go to ``torch.compile`` ("reduce-overhead" = CUDA
    graphs; on CPU, where tests run, "default").
    """

    def __init__(
        self,
        model: Model,
        *,
        max_batch: int = 16,
        terms: int = 2,
        backend: str = "inductor",
        mode: str | None = None,
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.table = SteeringTable(model, slots=max_batch, terms=terms)
        # Read by the hooks in Python: torch.compile guards on it, so each value has its
        # own graph and switching selects one (compiled once each) instead of retracing.
        self.shape = StepShape()
        on_cuda = model.device.type == "cuda"
        self.compile_options: dict[str, Any] = {
            "backend": backend,
            "mode": mode or ("reduce-overhead" if on_cuda else "default"),
        }
        # Up to 1 + 2 * terms graphs per batch size (set where generate compiles: below).
        self.graph_limit = 8 * (1 + 2 * terms)
        if on_cuda:
            # CUDA graphs read these at fixed addresses; in-place writes are seen by replays.
            for buffer in self.table.buffers():
                torch._dynamo.mark_static_address(buffer)
        fns = self.table.fixed_block_fns(self.shape)
        self.handle: HookHandle = attach(
            model.hf, model.blocks, fns, graph_safe=True, steering=True
        )

    def close(self) -> None:
        """Remove the hooks (the next compiled call retraces the plain model)."""
        self.handle.remove()
        if _instance(self.model) is self:
            delattr(self.model.hf, _ATTRIBUTE)

    def set_rows(
        self, row_specs: Sequence[Sequence[SteeringSpec]], prompt_lens: Sequence[int]
    ) -> None:
        """Write each row's specs into its slot (row i -> slot i + 1) and pick the shape."""
        if len(row_specs) != len(prompt_lens):
            raise ConfigError("give one prompt length per row of specs")
        if len(row_specs) > self.max_batch:
            raise ConfigError(
                f"{len(row_specs)} rows exceed this compiled path's max_batch "
                f"{self.max_batch}; split the batch or pass a larger max_batch to for_model"
            )
        slots = list(range(1, len(row_specs) + 1))
        self.table.set_many(
            [
                (slot, specs, int(n))
                for slot, specs, n in zip(slots, row_specs, prompt_lens, strict=True)
            ]
        )
        self.shape.terms = self.table.terms_in_use(slots)
        self.shape.full = self.table.needs_full(slots)

    @torch.no_grad()
    def generate_ids(
        self,
        batch: Mapping[str, torch.Tensor],
        row_specs: Sequence[Sequence[SteeringSpec]],
        *,
        max_new_tokens: int,
        **options: Any,
    ) -> torch.Tensor:
        """``model.hf.generate`` on the compiled path, row i steered by ``row_specs[i]``.

        `batch` is the tokenizer's output (``input_ids``, ``attention_mask``; left padded).
        Returns the full output ids, like ``generate``.
        """
        from transformers import CompileConfig

        ids = batch["input_ids"]
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        self.set_rows(row_specs, lengths)
        needed = int(ids.shape[1]) + max_new_tokens
        bucket = -(-needed // CACHE_BUCKET) * CACHE_BUCKET
        limit = getattr(self.model.hf.config, "max_position_embeddings", None)
        if isinstance(limit, int):
            bucket = min(bucket, max(limit, needed))
        config = CompileConfig(**self.compile_options)
        if self.model.device.type != "cuda":
            # transformers compiles only on GPUs unless told (a private flag, typed None)
            config._compile_all_devices = True  # type: ignore[assignment]
        generator = cast("GenerationMixin", self.model.hf)
        allow_graphs(self.graph_limit)  # in this thread, which is the one that compiles
        try:
            output = generator.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                cache_implementation="static",
                max_cache_len=bucket,
                compile_config=config,
                **options,
            )
        finally:
            self.shape.terms, self.shape.full = 0, False
        return cast(torch.Tensor, output)


def for_model(model: Model, **options: Any) -> CompiledSteering:
    """The model's `CompiledSteering`, made (and its hooks attached) on first use.

    `options` (max_batch, terms, backend, mode) apply when it is made; asking again with
    different options replaces it (its graphs recompile once).
    """
    existing = _instance(model)
    if existing is not None:
        same = (
            options.get("max_batch", existing.max_batch) == existing.max_batch
            and options.get("terms", existing.table.terms) == existing.table.terms
            and all(
                existing.compile_options.get(k) == v
                for k, v in options.items()
                if k in ("backend", "mode") and v is not None
            )
        )
        if same:
            return existing
        existing.close()
    made = CompiledSteering(model, **options)
    object.__setattr__(model.hf, _ATTRIBUTE, made)
    return made


def release(model: Model) -> None:
    """Detach the compiled path's hooks from `model`, if it has them."""
    existing = _instance(model)
    if existing is not None:
        existing.close()


def _instance(model: Model) -> CompiledSteering | None:
    found = model.hf.__dict__.get(_ATTRIBUTE)
    return found if isinstance(found, CompiledSteering) else None
