"""Batched text generation, optionally steered: the path the CLI and benchmarks share.

Prompts are rendered through the chat template (unless ``chat=False``), left-padded into
one batch and decoded by ``model.hf.generate``; steering hooks handle the KV cache and the
padding themselves, so a steered batch equals its rows run one by one.

On CUDA in bf16/fp16 (or with ``compiled=True``) decoding takes the compiled path of
`acteng.steering.compiled`: static KV cache, a compiled step, steering traced into the graph.
Extra hook contexts (a guard's) need the eager path.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import TYPE_CHECKING, Any, cast

import torch

from acteng.errors import ConfigError
from acteng.models import Model
from acteng.positions import Positions
from acteng.steering.apply import steer
from acteng.steering.compiled import for_model, wants_compiled
from acteng.steering.spec import SteeringSpec, as_specs
from acteng.vectors import SteeringVector

if TYPE_CHECKING:
    from transformers import GenerationMixin

__all__ = ["eos_ids", "generate", "generate_ids"]

Prompt = str | Sequence[dict[str, str]]


@torch.no_grad()
def generate(
    model: Model,
    prompts: str | Sequence[str] | Sequence[Sequence[dict[str, str]]],
    steering: SteeringVector | SteeringSpec | Sequence[SteeringSpec] | None = None,
    *,
    coefficient: float | None = None,
    layers: Sequence[int] | int | None = None,
    positions: str | Positions | None = None,
    mode: str | None = None,
    max_new_tokens: int = 64,
    chat: bool = True,
    system: str | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    compiled: bool | None = None,
) -> list[str]:
    """Generate completions for `prompts`, steered when `steering` is given.

    Each prompt is a string (one user turn) or a list of chat messages. Greedy by default
    (``temperature=0``). Returns only the new text of each prompt. `compiled` chooses the
    compiled decoding path (None: on CUDA in half precision, see `acteng.steering.compiled`).

    >>> acteng.generate(model, "Tell me about your day.", vector, coefficient=6.0)
    ['What a wonderful day ...']
    """
    rows = generate_ids(
        model,
        prompts,
        steering,
        coefficient=coefficient,
        layers=layers,
        positions=positions,
        mode=mode,
        max_new_tokens=max_new_tokens,
        chat=chat,
        system=system,
        temperature=temperature,
        seed=seed,
        compiled=compiled,
    )
    return [model.tokenizer.decode(row, skip_special_tokens=True) for row in rows]


@torch.no_grad()
def generate_ids(
    model: Model,
    prompts: str | Sequence[str] | Sequence[Sequence[dict[str, str]]],
    steering: SteeringVector | SteeringSpec | Sequence[SteeringSpec] | None = None,
    *,
    coefficient: float | None = None,
    layers: Sequence[int] | int | None = None,
    positions: str | Positions | None = None,
    mode: str | None = None,
    max_new_tokens: int = 64,
    chat: bool = True,
    system: str | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    contexts: Sequence[AbstractContextManager[Any]] = (),
    stopping_criteria: Any = None,
    compiled: bool | None = None,
) -> list[list[int]]:
    """`generate`, returning each row's new token ids (padding after EOS included).

    `contexts` are entered around the decoding call, after steering (extra hooks such as
    a guard's); `stopping_criteria` is passed to ``model.hf.generate``.
    """
    texts = _prompt_list(prompts)
    if not chat and not all(isinstance(t, str) for t in texts):
        raise ConfigError("chat=False takes plain string prompts, not message lists")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise ConfigError(f"max_new_tokens must be a whole number, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)  # numpy integers too
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if compiled and contexts:
        raise ConfigError(
            "extra hooks (a guard's or a monitor's) run only on the eager path; pass compiled=False"
        )
    use_compiled = not contexts and (wants_compiled(model) if compiled is None else compiled)
    tokenizer = model.tokenizer
    rendered = [_render(model, t, system) if chat else str(t) for t in texts]
    # Left padding (per call, not by mutating the shared tokenizer) so every row ends at
    # the same position and generation appends after its real last token.
    batch = tokenizer(
        rendered,
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=not chat,
    )
    model.check_length(int(batch["input_ids"].shape[1]) + max_new_tokens, "prompt + generation")
    batch = {k: v.to(model.device) for k, v in batch.items()}
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    else:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stopping_criteria is not None:
        options["stopping_criteria"] = stopping_criteria
    if use_compiled:
        specs = (
            []
            if steering is None
            else as_specs(steering, coefficient, layers, positions, mode, model=model)
        )
        return _generate_compiled(model, batch, specs, options, seed)
    generator = cast("GenerationMixin", model.hf)  # a transformers causal LM
    with ExitStack() as stack:
        if steering is not None:
            stack.enter_context(
                steer(
                    model,
                    steering,
                    coefficient=coefficient,
                    layers=layers,
                    positions=positions,
                    mode=mode,
                )
            )
        for context in contexts:
            stack.enter_context(context)
        # Sampling draws from torch's global generator: fork it so a seed stays local.
        stack.enter_context(
            torch.random.fork_rng(devices=[] if model.device.type == "cpu" else None)
        )
        if seed is not None:
            torch.manual_seed(seed)
        # a tensor of token ids: return_dict_in_generate is never set
        output = cast(torch.Tensor, generator.generate(**batch, **options))
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [row.tolist() for row in new_tokens]


def _generate_compiled(
    model: Model,
    batch: dict[str, torch.Tensor],
    specs: list[SteeringSpec],
    options: dict[str, Any],
    seed: int | None,
) -> list[list[int]]:
    """`generate_ids` on the compiled path, in chunks of its fixed maximum batch."""
    path = for_model(model)
    rows: list[list[int]] = []
    total = int(batch["input_ids"].shape[0])
    for start in range(0, total, path.max_batch):
        chunk = {k: v[start : start + path.max_batch] for k, v in batch.items()}
        # Drop the columns that are padding in every row of this chunk.
        keep = int(chunk["attention_mask"].sum(dim=1).max())
        chunk = {k: v[:, -keep:] for k, v in chunk.items()}
        with torch.random.fork_rng(devices=[] if model.device.type == "cpu" else None):
            if seed is not None:
                torch.manual_seed(seed)
            output = path.generate_ids(chunk, [specs] * int(chunk["input_ids"].shape[0]), **options)
        rows.extend(row.tolist() for row in output[:, chunk["input_ids"].shape[1] :])
    return rows


def _prompt_list(prompts: Any) -> list[Prompt]:
    """`prompts` as a list of prompts: one text, one conversation (a list of messages),
    or a list of texts and conversations; anything else is a clear error."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Iterable) or isinstance(prompts, bytes | dict):
        raise ConfigError(
            f"prompts must be a text, a list of texts or a list of message lists, got "
            f"{type(prompts).__name__}"
        )
    texts = list(prompts)  # any iterable: a generator, a pandas Series, ...
    if texts and all(isinstance(m, dict) for m in texts):
        texts = [texts]  # one conversation
    if not texts:
        raise ConfigError("no prompts given; pass at least one prompt")
    for i, prompt in enumerate(texts):
        if isinstance(prompt, str):
            continue
        if (
            not isinstance(prompt, Sequence)
            or not prompt
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in prompt
            )
        ):
            raise ConfigError(
                f"prompt {i} must be a text or a list of messages like "
                f'{{"role": "user", "content": "..."}}, got {str(prompt)[:80]!r}'
            )
    return texts


def _render(model: Model, prompt: Prompt, system: str | None) -> str:
    if isinstance(prompt, str):
        return model.render_prompt(prompt, system=system)
    messages = list(prompt)
    if system and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return model.render_chat(messages)


def eos_ids(model: Model) -> set[int]:
    """The token ids that end a generation: the tokenizer's and the generation config's."""
    ids: set[int] = set()
    config: Any = getattr(model.hf, "generation_config", None)
    for value in (model.tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
