"""`SteeringVector`: one direction per layer plus provenance, saved as safetensors.

File format (the SPEC's contract): one float32 tensor per layer named ``layers.{i}``, shape
``[hidden_size]``; safetensors metadata holds JSON strings for ``acteng.version``, ``model``,
``method``, ``read_position``, ``layers``, ``normalize``, ``dataset`` and ``created``. Files
are written to a temporary name and renamed, so a crash never leaves half a file. Nothing
is pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from acteng.errors import ConfigError, IncompatibleVectorError, VectorFileError

if TYPE_CHECKING:
    from acteng.models import Model

__all__ = [
    "MAX_VECTOR_NORM",
    "METADATA_KEYS",
    "SteeringVector",
    "atomic_write_bytes",
    "check_magnitude",
    "vector_from_file",
]

_TENSOR_NAME = re.compile(r"layers\.(\d+)")
# The SPEC's metadata contract: every saved vector carries these keys.
METADATA_KEYS = (
    "acteng.version",
    "model",
    "method",
    "read_position",
    "layers",
    "normalize",
    "dataset",
    "created",
)


def _version() -> str:
    from acteng import __version__

    return __version__


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_finite(directions: Mapping[int, torch.Tensor]) -> None:
    bad = [layer for layer, t in directions.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ConfigError(
            f"vector has NaN or inf values at layer(s) {sorted(bad)}; rebuild it from finite "
            "activations (check the model dtype and the data)"
        )


# Per-layer norms a stored vector may have. Steering adds coefficient x vector (|c| <= 1e4)
# and the model's norm layers square the residual: at 1e12 the squares stay far inside
# float32's range (3.4e38), while real directions have norms of 1e-3 to 1e3.
MAX_VECTOR_NORM = 1e12
MIN_NONZERO_NORM = 1e-12


def check_magnitude(vector: SteeringVector, *, source: str = "the vector") -> None:
    """Refuse a vector whose norms would overflow the model's activations when used, or
    so small that a unit direction cannot be computed from it (zero layers are allowed)."""
    problems = []
    for layer, direction in vector.directions.items():
        norm = float(direction.double().norm())
        if not norm <= MAX_VECTOR_NORM or 0 < norm < MIN_NONZERO_NORM:
            problems.append(f"{layer}: {norm:.3g}")
    if problems:
        raise ConfigError(
            f"{source} has layer norms out of range ({', '.join(problems[:5])}); norms must be "
            f"0 or between {MIN_NONZERO_NORM:g} and {MAX_VECTOR_NORM:g}, or steering and "
            "scores overflow: rescale it (vector.normalized()), or rebuild its file"
        )


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """A direction per layer (``{layer: [hidden_size]}``) plus provenance metadata.

    Supports ``2 * v``, ``v / 2``, ``-v``, ``v + w``, ``v - w`` (layers missing on one
    side count as zero), ``.normalized()``, ``.to()``, ``.save()`` and ``.load()``.

    >>> v = acteng.extract(model, pairs, layers=[12])
    >>> (2 * v).save("v.safetensors")
    >>> w = acteng.SteeringVector.load("v.safetensors", model=model)
    """

    directions: Mapping[int, torch.Tensor]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.directions:
            raise ConfigError("a steering vector needs at least one layer")
        bad = [
            f"{k!r}: {type(v).__name__}{tuple(v.shape) if isinstance(v, torch.Tensor) else ''}"
            for k, v in self.directions.items()
            if isinstance(k, bool)
            or not isinstance(k, int)
            or k < 0
            or not isinstance(v, torch.Tensor)
            or v.dim() != 1
            or v.is_complex()
        ]
        if bad:
            raise ConfigError(
                "a steering vector maps layer numbers (>= 0) to 1-D tensors of real numbers; got "
                + ", ".join(bad)
            )
        widths = {int(t.shape[-1]) for t in self.directions.values()}
        shapes_ok = all(t.dim() == 1 for t in self.directions.values())
        if len(widths) != 1 or not shapes_ok:
            raise ConfigError(
                "every layer of a vector must be a 1-D tensor of the same width; got shapes "
                + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in sorted(self.directions.items()))
            )
        _check_finite(self.directions)
        frozen = {  # copies (integer ones as float32): the caller's tensors cannot change it
            int(k): (v if v.is_floating_point() else v.float()).detach().clone()
            for k, v in sorted(self.directions.items())
        }
        object.__setattr__(self, "directions", MappingProxyType(frozen))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    # --- shape -------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.directions)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])

    def __getitem__(self, layer: int) -> torch.Tensor:
        try:
            return self.directions[layer]
        except KeyError:
            raise ConfigError(
                f"vector has no layer {layer}; its layers are {list(self.layers)}"
            ) from None

    def __repr__(self) -> str:
        norms = ", ".join(f"{k}: {float(v.norm()):.3g}" for k, v in self.directions.items())
        method = self.metadata.get("method", "?")
        return (
            f"SteeringVector(method={method!r}, hidden_size={self.hidden_size}, norms={{{norms}}})"
        )

    def content_hash(self) -> str:
        """SHA-256 of the directions (float32) and the metadata (sorted JSON): stable across
        saves (unlike the file bytes) once the vector has been through a file, since the
        first save fills in default metadata."""
        digest = hashlib.sha256()
        for layer, tensor in self.directions.items():
            digest.update(f"layers.{layer}:".encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        digest.update(json.dumps(dict(self.metadata), sort_keys=True, default=str).encode())
        return digest.hexdigest()

    def norms(self) -> dict[int, float]:
        return {k: float(v.norm()) for k, v in self.directions.items()}

    # --- algebra -----------------------------------------------------------------------
    def _with(self, directions: Mapping[int, torch.Tensor], **meta: Any) -> SteeringVector:
        return SteeringVector(directions, {**self.metadata, **meta})

    def __mul__(self, scale: float) -> SteeringVector:
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
            return NotImplemented
        if not math.isfinite(scale):
            raise ConfigError(f"cannot scale a vector by {scale}; use a finite number")
        factor = float(scale)
        # A scaled unit vector is no longer unit: record the scale instead.
        meta: dict[str, Any] = {"scale": float(self.metadata.get("scale") or 1.0) * factor}
        if factor != 1.0 and self.metadata.get("normalize") is not None:
            meta["normalize"] = None
        return self._with({k: v * factor for k, v in self.directions.items()}, **meta)

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> SteeringVector:
        if scale == 0:
            raise ConfigError("cannot divide a vector by 0")
        return self * (1.0 / scale)

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def __add__(self, other: SteeringVector) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.hidden_size != self.hidden_size:
            raise IncompatibleVectorError(
                f"cannot combine vectors of widths {self.hidden_size} and {other.hidden_size}"
            )
        merged = dict(self.directions)
        for k, v in other.directions.items():
            merged[k] = merged[k] + v.to(merged[k]) if k in merged else v.clone()
        # The sum no longer comes from one dataset or read position; keep both sources.
        return SteeringVector(
            merged,
            {
                "model": self.metadata.get("model"),
                "method": "combination",
                "normalize": None,
                "sources": [_provenance(self), _provenance(other)],
            },
        )

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self + (-other)

    def normalized(self) -> SteeringVector:
        """Each layer scaled to unit norm (recorded as ``normalize: "unit"``)."""
        zero = [k for k, v in self.directions.items() if float(v.norm()) == 0.0]
        if zero:
            raise ConfigError(f"cannot normalise layer(s) {zero}: the direction is zero")
        unit = {k: v / v.norm() for k, v in self.directions.items()}
        return self._with(unit, normalize="unit", scale=None)

    def select(self, layers: list[int] | tuple[int, ...]) -> SteeringVector:
        """The same vector restricted to `layers`."""
        missing = [x for x in layers if x not in self.directions]
        if missing:
            raise ConfigError(
                f"vector has no layer(s) {missing}; its layers are {list(self.layers)}"
            )
        return self._with({k: self.directions[k] for k in layers})

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SteeringVector:
        return self._with({k: v.to(device=device, dtype=dtype) for k, v in self.directions.items()})

    # --- compatibility -----------------------------------------------------------------
    def check_compatible(self, model: Model) -> None:
        """Raise IncompatibleVectorError if the vector cannot steer `model`."""
        problems = []
        if self.hidden_size != model.hidden_size:
            problems.append(f"vector width {self.hidden_size} != model width {model.hidden_size}")
        made_for = self.metadata.get("model")
        if isinstance(made_for, Mapping) and made_for.get("num_layers") not in (
            None,
            model.num_layers,
        ):
            problems.append(
                f"vector made for a model with {made_for.get('num_layers')} layers, "
                f"this model has {model.num_layers}"
            )
        beyond = [x for x in self.layers if not 0 <= x < model.num_layers]
        if beyond:
            problems.append(f"layer(s) {beyond} do not exist (model has {model.num_layers})")
        if problems:
            name = made_for.get("name") if isinstance(made_for, Mapping) else "another model"
            raise IncompatibleVectorError(
                "; ".join(problems) + f". This vector was made for {name}; load or extract a "
                f"vector made for {model.name}"
            )

    # --- files -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the SPEC's safetensors format atomically; returns the path."""
        target = Path(path)
        atomic_write_bytes(target, self.to_bytes())
        return target

    def to_bytes(self) -> bytes:
        """The file content `save` writes (safetensors with JSON metadata)."""
        from safetensors.torch import save

        tensors = {
            f"layers.{k}": v.detach().to("cpu", torch.float32).contiguous()
            for k, v in self.directions.items()
        }
        meta = dict(self.metadata)
        for key in METADATA_KEYS:
            meta.setdefault(key, None)
        meta["created"] = meta["created"] or datetime.now(UTC).isoformat(timespec="seconds")
        meta["layers"] = list(self.layers)
        meta["acteng.version"] = _version()
        header = {key: json.dumps(value) for key, value in meta.items()}
        data: bytes = save(tensors, metadata=header)
        return data

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, model: Model | None = None) -> SteeringVector:
        """Read a vector file; with `model`, also check it fits that model."""
        source = Path(path)
        if not source.is_file():
            raise VectorFileError(f"no vector file at {source}; check the path")
        return cls.from_bytes(source.read_bytes(), source=source, model=model)

    @classmethod
    def from_bytes(
        cls, data: bytes, *, source: Path | str = "<bytes>", model: Model | None = None
    ) -> SteeringVector:
        """Parse the content of a vector file (`source` names it in errors)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        source = Path(source)
        try:
            tensors = load(data)
            header = _read_metadata(data)
        except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
            raise VectorFileError(
                f"{source} is not a valid acteng vector file ({exc}); it may be truncated or "
                "another format: re-create it with `acteng extract` (GGUF control vectors "
                "need `acteng import`)"
            ) from exc
        directions: dict[int, torch.Tensor] = {}
        foreign = []
        for name, tensor in tensors.items():
            match = _TENSOR_NAME.fullmatch(name)
            if match is None or tensor.dim() != 1:
                foreign.append(f"{name} {tuple(tensor.shape)}")
            else:
                directions[int(match.group(1))] = tensor.to(torch.float32)
        if foreign or not directions:
            raise VectorFileError(
                f"{source} holds tensors that are not per-layer directions "
                f"(expected 1-D 'layers.{{i}}'): {', '.join(foreign) or 'none at all'}"
            )
        metadata = {}
        for key, raw in header.items():
            try:
                metadata[key] = json.loads(raw)
            except json.JSONDecodeError:
                metadata[key] = raw
        return vector_from_file(source, directions, metadata, model)


def vector_from_file(
    source: Path,
    directions: dict[int, torch.Tensor],
    metadata: dict[str, Any],
    model: Model | None,
) -> SteeringVector:
    """Build a vector read from `source`; invalid content is a VectorFileError naming it."""
    try:
        vector = SteeringVector(directions, metadata)
        check_magnitude(vector)  # a file is never trusted to be usable
    except ConfigError as exc:
        raise VectorFileError(f"{source}: {exc}") from exc
    if model is not None:
        vector.check_compatible(model)
    return vector


def _provenance(vector: SteeringVector) -> dict[str, Any]:
    keys = ("method", "read_position", "dataset", "normalize", "scale", "sources")
    return {k: vector.metadata[k] for k in keys if vector.metadata.get(k) is not None}


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__", {}) or {}
    return {str(k): str(v) for k, v in meta.items()}
