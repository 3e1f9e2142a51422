"""Names a request may use: pinned vectors, the bundled vectors, then the server's library.

Bundled names are reserved (the library refuses them), and the detector of a server's
default guard is pinned at start: no upload, rename or delete can change what a name
the guard relies on means.

Requests name vectors and detectors; they never give paths (a name is checked by
`acteng.library.validate_name` before anything is looked up). Every failure is a
`RequestError` naming the field, the name and where to find valid names. The same object
serves ``/v1/vectors``: list, show, upload (checked against the served model) and delete.
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from acteng.bundled import bundled_files
from acteng.detectors import Detector
from acteng.errors import ActengError, ConfigError, LibraryError, RequestError
from acteng.library import VectorLibrary, refuse_bundled_name, validate_name
from acteng.models import Model
from acteng.monitoring import Readout
from acteng.vectors import SteeringVector

__all__ = ["Monitored", "Resolver"]

MAX_UPLOAD_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Monitored:
    """A vector or detector whose per-token scores a request asked for."""

    key: str  # unique per (name, layers)
    name: str
    layers: tuple[int, ...]
    units: dict[int, torch.Tensor]  # layer -> unit direction on the model's device
    detector: Detector | None = None


def table_entries(
    monitored: Sequence[Monitored], width: int, engine: str
) -> Iterator[tuple[int, int, torch.Tensor, float, float]]:
    """What a fixed-width monitor table stores for one request's monitors: (column, layer,
    unit direction in float32, weight, bias), ``weight * (h . unit) + bias`` being that
    layer's share of the column's score (`Readout.affine`). The compiled engine's
    `MonitorTable` and the vLLM plugin's monitors lay these out in their own tensors."""
    if len(monitored) > width:
        raise ConfigError(
            f"{len(monitored)} monitors on one request exceed {engine}'s {width}; ask for fewer"
        )
    for column, monitor in enumerate(monitored):
        readout = Readout(monitor.units, monitor.detector)
        for layer in readout.layers:
            weight, bias = readout.affine(layer)
            yield column, layer, readout.units[layer].to(torch.float32), weight, bias


class Resolver:
    """Look up vectors, detectors and monitors by name for one served model."""

    def __init__(self, model: Model, library: VectorLibrary) -> None:
        self.model = model
        self.library = library
        self.pinned: dict[str, SteeringVector] = {}

    def pin(self, name: Any, param: str) -> dict[str, Any]:
        """Load `name` now and answer every later lookup of it with this vector.

        Returns what was pinned: the name, where it came from and the sha256 of its bytes.
        """
        vector, source = self._load(name, param)
        self.pinned[name] = vector
        digest = hashlib.sha256(vector.to_bytes()).hexdigest()
        return {"detector": name, "source": source, "sha256": digest}

    # --- lookups for requests ----------------------------------------------------------
    def _load(self, name: Any, param: str) -> tuple[SteeringVector, str]:
        if not isinstance(name, str):
            raise RequestError(
                f"{param} must be a vector name (a string), got {name!r}", param=param
            )
        try:
            validate_name(name)
        except ConfigError as exc:
            raise RequestError(f"{param}: {exc}", param=param) from exc
        try:
            if name in self.pinned:
                vector = self.pinned[name]
                vector.check_compatible(self.model)
                return vector, "pinned"
            bundled = bundled_files()
            if name in bundled:
                return SteeringVector.load(bundled[name], model=self.model), "bundled"
            if name in self.library:
                return self.library.load(name, model=self.model), "library"
        except ActengError as exc:
            raise RequestError(f"{param}: vector {name!r} cannot be used: {exc}", param) from exc
        raise RequestError(
            f"{param}: no vector or detector named {name!r}; GET /v1/vectors lists the names, "
            "POST /v1/vectors?name=... uploads one",
            param=param,
            status=404,
        )

    def vector(self, name: Any, param: str) -> SteeringVector:
        return self._load(name, param)[0]

    def detector(self, name: Any, param: str) -> Detector:
        vector = self.vector(name, param)
        try:
            return Detector.from_vector(vector, source=repr(name))
        except ActengError as exc:
            raise RequestError(f"{param}: {exc}", param=param) from exc

    def monitored(self, name: Any, layers: tuple[int, ...] | None, param: str) -> Monitored:
        vector = self.vector(name, param)
        detector = None
        if isinstance(vector.metadata.get("detector"), dict):
            detector = self.detector(name, param)
        chosen = layers or vector.layers
        try:
            readout = Readout.of(self.model, vector if detector is None else detector, chosen)
        except ActengError as exc:
            raise RequestError(f"{param}: {name!r}: {exc}", param=param) from exc
        key = f"{name}@{','.join(map(str, chosen))}"
        return Monitored(key, str(name), tuple(chosen), readout.units, detector)

    # --- /v1/vectors ---------------------------------------------------------------------
    def _describe(self, name: str, vector: SteeringVector | None, source: str) -> dict[str, Any]:
        out: dict[str, Any] = {"id": name, "object": "vector", "source": source}
        if vector is None:
            return out
        meta = vector.metadata
        detector = meta.get("detector")
        model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
        out.update(
            kind="detector" if isinstance(detector, dict) else "vector",
            layers=list(vector.layers),
            hidden_size=vector.hidden_size,
            method=meta.get("method"),
            model=(model or {}).get("name"),
            created=meta.get("created"),
            norms={str(k): round(v, 4) for k, v in vector.norms().items()},
        )
        if isinstance(detector, dict):
            out["threshold"] = detector.get("threshold")
            out["region"] = detector.get("region")
        try:
            vector.check_compatible(self.model)
            out["compatible"] = True
        except ActengError as exc:
            out["compatible"] = False
            out["problem"] = str(exc)
        return out

    def list(self) -> builtins.list[dict[str, Any]]:
        items = []
        seen = set()
        bundled = bundled_files()
        for entry in self.library.list():
            seen.add(entry.name)
            vector = None
            if entry.problem is None:
                try:
                    vector = self.library.load(entry.name)
                except ActengError:
                    vector = None
            item = self._describe(entry.name, vector, "library")
            item["tags"] = entry.tags
            if entry.problem is not None:
                item["problem"] = f"broken: {entry.problem}"
                item["compatible"] = False
            elif entry.name in bundled:  # stored before bundled names were reserved
                item["problem"] = "shadowed: the name means the bundled vector; rename it"
                item["compatible"] = False
            items.append(item)
        for name, path in sorted(bundled.items()):
            items.append(self._describe(name, SteeringVector.load(path), "bundled"))
        return items

    def show(self, name: str) -> dict[str, Any]:
        vector, source = self._load(name, "name")
        item = self._describe(name, vector, source)
        if source == "library":
            entry = self.library.get(name)
            item.update(tags=entry.tags, sha256=entry.sha256, card=entry.card)
        return item

    def upload(
        self, name: str, data: bytes, *, tags: builtins.list[str], overwrite: bool
    ) -> dict[str, Any]:
        try:
            validate_name(name)
            refuse_bundled_name(name)
        except ConfigError as exc:
            raise RequestError(str(exc), param="name") from exc
        except LibraryError as exc:
            raise RequestError(str(exc), param="name", status=409) from exc
        if len(data) > MAX_UPLOAD_BYTES:
            raise RequestError(
                f"the file has {len(data)} bytes; vectors are limited to {MAX_UPLOAD_BYTES}",
                status=413,
            )
        try:
            # from_bytes also refuses norms out of range (vectors.vector_from_file)
            vector = SteeringVector.from_bytes(data, source="the uploaded file")
            vector.check_compatible(self.model)
            if isinstance(vector.metadata.get("detector"), dict):
                Detector.from_vector(vector, source="the uploaded detector")
        except ActengError as exc:
            raise RequestError(
                f"{exc}; upload a safetensors vector file made for {self.model.name}"
            ) from exc
        if name in self.library and not overwrite:
            raise RequestError(
                f"a vector named {name!r} already exists; delete it first or add overwrite=true",
                param="name",
                status=409,
            )
        try:
            self.library.add(name, vector, tags=tags, overwrite=overwrite)
        except LibraryError as exc:
            raise RequestError(str(exc), status=409) from exc
        return self.show(name)

    def delete(self, name: str) -> None:
        try:
            validate_name(name)
        except ConfigError as exc:
            raise RequestError(str(exc), param="name") from exc
        if name not in self.library:
            if name in bundled_files():
                raise RequestError(f"{name!r} is bundled with acteng and cannot be deleted", "name")
            raise RequestError(f"no vector named {name!r} in the library", "name", status=404)
        self.library.remove(name)
