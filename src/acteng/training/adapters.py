"""Trained weight edits as standard PEFT adapter folders, with acteng's provenance.

A trainer that edits whole matrices (RMU edits three MLP output projections) saves each
edit ``W_new - W_old`` as a full-rank LoRA pair (``B @ A`` equals the difference, from its
SVD; ``lora_alpha = r`` so PEFT's scale is 1). The folder is then what PEFT writes itself
(``adapter_config.json`` + ``adapter_model.safetensors``): `acteng.load_model(adapter=...)`,
``PeftModel.from_pretrained`` and ``acteng serve --adapter`` load it, and PEFT's
``merge_and_unload`` merges it. ``acteng_training.json`` beside them records the method,
the model it was trained on, data hashes, hyperparameters, the training log and any
figures measured later (`record_figures`).

Folders are written whole into a temporary sibling and then swapped in, so an interrupted
save (Ctrl-C, a full disk) leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from acteng.errors import ConfigError, missing_extra
from acteng.models import ADAPTER_PROVENANCE, Model

__all__ = [
    "PROVENANCE_FILE",
    "check_base_model",
    "read_provenance",
    "record_figures",
    "save_weight_edits",
    "texts_hash",
]

PROVENANCE_FILE = ADAPTER_PROVENANCE


def check_base_model(model: Model, method: str) -> None:
    """Refuse to train on a model that carries an adapter: the new adapter would be trained
    for the base plus that adapter, a model `load_model` cannot rebuild (it applies one),
    so it would train for minutes and then never load."""
    _, sep, adapter = model.content_hash.partition("+adapter:")
    if sep:
        raise ConfigError(
            f"{method} needs a model without an adapter, and this one carries {adapter!r}; "
            "merge that adapter into a model folder first (acteng train merge --adapter "
            "DIR --out MERGED) and train on it (--model MERGED)"
        )


def texts_hash(texts: Sequence[str]) -> str:
    """sha256 of the texts in order (what a provenance record names a data set by)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def _lora_pair(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with ``B @ A == delta`` exactly and r = min(out, in): the
    edit itself on one side, an identity on the other. (An SVD gives the same shapes but
    took minutes a checkpoint for an 8B model's MLP projections, 4096 x 14336, on CPU,
    and is exact only to its float32 rounding.)"""
    out_features, in_features = delta.shape
    edit = delta.float().contiguous()
    if out_features <= in_features:
        return edit, torch.eye(out_features)
    return torch.eye(in_features), edit


def save_weight_edits(
    model: Model,
    edits: Mapping[str, torch.Tensor],
    folder: str | os.PathLike[str],
    provenance: Mapping[str, Any],
) -> Path:
    """Save `edits` (module path -> ``W_new - W_old`` of that Linear's weight) as a PEFT
    LoRA folder at `folder`, replacing it whole; returns the folder."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise missing_extra("peft", "peft", purpose="saving a trained adapter") from None
    from safetensors.torch import save_file

    if not edits:
        raise ConfigError("nothing to save: no weight was edited")
    ranks = {min(delta.shape) for delta in edits.values()}
    if len(ranks) != 1:
        raise ConfigError(f"the edited matrices need one shape to share a rank, got {ranks}")
    rank = ranks.pop()
    tensors: dict[str, torch.Tensor] = {}
    for path, delta in edits.items():
        a, b = _lora_pair(delta.detach().cpu())
        tensors[f"base_model.model.{path}.lora_A.weight"] = a
        tensors[f"base_model.model.{path}.lora_B.weight"] = b
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scale 1: B @ A is the edit itself
        lora_dropout=0.0,
        target_modules=sorted(edits),
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=True,
    )
    config.base_model_name_or_path = model.name
    record = {**provenance, "model": model.identity(), "edited_modules": sorted(edits)}
    target = Path(folder)
    with staged_folder(target) as staging:
        config.save_pretrained(str(staging))
        save_file(tensors, str(staging / "adapter_model.safetensors"))
        (staging / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return target


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A temporary sibling of `target` to write a whole folder into; on success it
    replaces `target` (`swap_in`), on any error it is removed and `target` is untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by `staging`: at every moment one complete folder is at `target`
    or at its ``.old`` sibling (restored from there if the rename between fails)."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_provenance(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``acteng_training.json`` of an adapter folder ({} for a folder acteng did not
    train)."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return {}
    record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return record


def record_figures(folder: str | os.PathLike[str], figures: Mapping[str, Any]) -> None:
    """Add measured `figures` to an adapter's provenance (merged into ``"figures"``)."""
    path = Path(folder) / PROVENANCE_FILE
    record = read_provenance(folder)
    if not record:
        raise ConfigError(f"{folder} has no {PROVENANCE_FILE}: it was not trained by acteng")
    record["figures"] = {**record.get("figures", {}), **figures}
    staging = path.with_name(f".{PROVENANCE_FILE}.tmp")
    staging.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(staging, path)
