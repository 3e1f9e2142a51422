"""Merge an adapter into its base model and save a plain transformers model folder.

The folder (``config.json``, ``model.safetensors``, the tokenizer) loads with
``AutoModelForCausalLM.from_pretrained`` alone, with no PEFT, so any engine that reads
transformers folders (vLLM, TGI, llama.cpp's converter) can serve the edited model.
``acteng_merged.json`` beside them says what was merged: the base model, the adapter and
its acteng provenance, if it has one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from acteng.errors import ConfigError, missing_extra
from acteng.models import load_model
from acteng.training.adapters import read_provenance, staged_folder

__all__ = ["MERGED_RECORD", "merge_adapter"]

MERGED_RECORD = "acteng_merged.json"


def merge_adapter(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | None = None,
    dtype: str = "float32",
    force: bool = False,
) -> Path:
    """Merge the PEFT adapter folder `adapter` into the model `source` (default: the
    embedded model; `acteng.load_model`'s sources) and save the result at `out`.

    The adapter is checked as `load_model(adapter=...)` checks it (an acteng adapter
    trained on another model is refused). `out` is written whole, then swapped in; an
    existing folder is replaced only with `force`, and never one that holds no model.

    >>> acteng.training.merge_adapter("rmu-adapter", "smollm2-unlearned")
    """
    target = Path(out)
    if target.exists():
        if not force:
            raise ConfigError(f"{target} exists; replace it with force=True (--force in the CLI)")
        if not (target / "config.json").is_file():
            raise ConfigError(f"{target} is not a model folder; refusing to replace it")
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        raise missing_extra("peft", "peft", purpose="merging an adapter") from None
    model = load_model(source, adapter=adapter, dtype=dtype)
    hf: Any = model.hf
    merged = 0
    for name, module in list(hf.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(hf.get_submodule(parent), child, module.get_base_layer())
            merged += 1
    if not merged:
        raise ConfigError(f"{adapter} changed no layer of the model: nothing to merge")
    hf.config.name_or_path = f"{model.name}+{Path(adapter).name}"
    record = {
        "base_model": model.name,
        "adapter": os.fspath(Path(adapter).resolve()),
        "merged_layers": merged,
        "dtype": dtype,
        "training": read_provenance(adapter) or None,
    }
    with staged_folder(target) as staging:
        hf.save_pretrained(str(staging), safe_serialization=True)
        model.tokenizer.save_pretrained(str(staging))
        (staging / MERGED_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return target
