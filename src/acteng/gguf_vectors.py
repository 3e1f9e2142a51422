"""llama.cpp GGUF control vectors: export and import.

The format (as written by repeng and llama.cpp's cvector-generator): GGUF architecture
``controlvector``, keys ``controlvector.model_hint`` (string) and
``controlvector.layer_count`` (int32 from llama.cpp, uint32 from repeng), one float32 1-D
tensor ``direction.{n}`` per layer. llama.cpp adds ``direction.{n}`` to the output of its
0-based block n and has no slot for block 0, so acteng layer i <-> ``direction.{i}`` and
layer 0 cannot be exported. `gguf_layer` is the one place that conversion lives.

acteng adds its own provenance as the string key ``acteng.metadata`` (JSON); llama.cpp
ignores unknown keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from acteng.errors import ConfigError, VectorFileError
from acteng.vectors import SteeringVector, atomic_write_bytes, vector_from_file

if TYPE_CHECKING:
    from acteng.models import Model

__all__ = ["export_gguf", "gguf_layer", "import_gguf"]

ARCHITECTURE = "controlvector"
_DIRECTION = re.compile(r"direction\.(\d+)")


def gguf_layer(index: int, *, to: Literal["gguf", "acteng"]) -> int:
    """Convert a layer index between acteng and llama.cpp's ``direction.{n}``.

    Both name the output of 0-based block n, so the index is the same; llama.cpp has no
    control-vector slot for block 0, so 0 is refused in both directions.
    """
    if index < 1:
        where = "acteng layer" if to == "gguf" else "GGUF direction"
        raise ConfigError(
            f"{where} {index} cannot be used: llama.cpp control vectors start at block 1 "
            "(direction.{n} is added to the output of block n and block 0 has no slot); "
            "drop layer 0 first (extract without it, e.g. `acteng extract --layers 1-29`; in "
            "Python: vector.select([...]))"
        )
    return index


def export_gguf(
    vector: SteeringVector, path: str | os.PathLike[str], *, model_hint: str | None = None
) -> Path:
    """Write `vector` as a llama.cpp control vector (atomically).

    >>> acteng.export_gguf(vector, "sentiment.gguf")   # llama-cli --control-vector sentiment.gguf
    """
    from gguf import GGUFWriter

    layers = {gguf_layer(i, to="gguf"): t for i, t in vector.directions.items()}
    made_for = vector.metadata.get("model")
    hint = model_hint or (made_for.get("family") if isinstance(made_for, dict) else None) or ""
    target = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "vector.gguf"
        writer = GGUFWriter(str(staged), ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", str(hint))
        writer.add_int32(f"{ARCHITECTURE}.layer_count", len(layers))
        writer.add_string("acteng.metadata", json.dumps(dict(vector.metadata), default=str))
        for n, tensor in sorted(layers.items()):
            writer.add_tensor(f"direction.{n}", tensor.detach().cpu().float().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        atomic_write_bytes(target, staged.read_bytes())  # never half a file at `target`
    return target


def _field_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def import_gguf(path: str | os.PathLike[str], *, model: Model | None = None) -> SteeringVector:
    """Read a llama.cpp / repeng control vector as a `SteeringVector`.

    >>> vector = acteng.import_gguf("happy.gguf", model=model)
    """
    from gguf import GGUFReader

    source = Path(path)
    if not source.is_file():
        raise VectorFileError(f"no GGUF file at {source}; check the path")
    try:
        reader = GGUFReader(str(source))
        architecture = _field_value(reader, "general.architecture")
    except (ValueError, OSError, IndexError, KeyError, TypeError) as exc:
        raise VectorFileError(
            f"{source} is not a readable GGUF file ({exc}); it may be truncated or another format"
        ) from exc
    if architecture != ARCHITECTURE:
        raise VectorFileError(
            f"{source} has GGUF architecture {architecture!r}, not {ARCHITECTURE!r}: it is a "
            "model or another adapter, not a control vector"
        )
    directions: dict[int, torch.Tensor] = {}
    problems = []
    for tensor in reader.tensors:
        match = _DIRECTION.fullmatch(tensor.name)
        data = np.asarray(tensor.data)
        if match is None:
            problems.append(f"unexpected tensor {tensor.name!r}")
            continue
        if tensor.tensor_type.name != "F32" or data.ndim != 1:
            problems.append(f"{tensor.name} is {tensor.tensor_type.name} {data.shape}, not F32 1-D")
            continue
        try:
            layer = gguf_layer(int(match.group(1)), to="acteng")
        except ConfigError as exc:
            raise VectorFileError(f"{source}: {exc}") from exc
        if layer in directions:
            problems.append(f"duplicate layer {layer}")
            continue
        directions[layer] = torch.from_numpy(data.astype(np.float32).copy())
    if problems or not directions:
        found = "; ".join(problems) or "no direction tensors"
        raise VectorFileError(f"{source} is not a valid control vector: {found}")
    metadata: dict[str, Any] = {"method": "gguf-import", "normalize": None}
    extra = _field_value(reader, "acteng.metadata")
    if isinstance(extra, str):
        # A foreign writer's malformed extra key: keep the plain import metadata.
        with contextlib.suppress(json.JSONDecodeError):
            parsed = json.loads(extra)
            if isinstance(parsed, dict):
                metadata.update(parsed)
    metadata["gguf"] = {
        "file": source.name,
        "model_hint": _field_value(reader, f"{ARCHITECTURE}.model_hint"),
        "layer_count": _field_value(reader, f"{ARCHITECTURE}.layer_count"),
    }
    return vector_from_file(source, directions, metadata, model)
