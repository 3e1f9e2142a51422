"""GGUF control vectors: round trip, foreign writers' files, and bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch

import acteng
from acteng.errors import ConfigError, IncompatibleVectorError, VectorFileError
from acteng.gguf_vectors import gguf_layer
from tests.helpers import random_vector


def write_gguf(
    path: Path, arch: str, tensors: dict[str, np.ndarray], *, count_type: str = "i32"
) -> Path:
    """A control vector as llama.cpp's cvector-generator (int32) or repeng (uint32) write it."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", "llama")
    count = len(tensors)
    if count_type == "i32":
        writer.add_int32(f"{arch}.layer_count", count)
    else:
        writer.add_uint32(f"{arch}.layer_count", count)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_round_trip_keeps_layers_values_and_provenance(
    tiny_llama: acteng.Model, tmp_path: Path
) -> None:
    v = acteng.extract(tiny_llama, [("good", "bad"), ("kind", "cruel")], layers=[1, 3])
    path = acteng.export_gguf(v, tmp_path / "v.gguf")
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.layer_count"].contents() == 2
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.3"]
    back = acteng.import_gguf(path, model=tiny_llama)
    assert back.layers == (1, 3)
    for layer in v.layers:
        assert torch.equal(back[layer], v[layer])
    assert back.metadata["method"] == "mean_diff"
    assert back.metadata["dataset"] == v.metadata["dataset"]
    assert [p.name for p in tmp_path.iterdir()] == ["v.gguf"]


@pytest.mark.parametrize("count_type", ["i32", "u32"])
def test_imports_llama_cpp_and_repeng_files(tmp_path: Path, count_type: str) -> None:
    tensors = {f"direction.{n}": np.full(8, float(n), np.float32) for n in (1, 2, 5)}
    path = write_gguf(tmp_path / "c.gguf", "controlvector", tensors, count_type=count_type)
    v = acteng.import_gguf(path)
    assert v.layers == (1, 2, 5) and float(v[5][0]) == 5.0
    assert v.metadata["gguf"]["layer_count"] == 3 and v.metadata["method"] == "gguf-import"


def test_vectors_too_large_to_use_are_refused_on_import(tmp_path: Path) -> None:
    huge = acteng.SteeringVector({1: torch.full((8,), 1e30)}, {})
    for path in (acteng.export_gguf(huge, tmp_path / "huge.gguf"), huge.save(tmp_path / "h.st")):
        with pytest.raises(VectorFileError, match="norms out of range"):
            acteng.import_gguf(path) if str(path).endswith(".gguf") else acteng.load_vector(path)


def test_layer_zero_cannot_be_exported(tiny_llama: acteng.Model, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="block 0 has no slot"):
        acteng.export_gguf(random_vector(tiny_llama, [0, 1]), tmp_path / "v.gguf")
    assert list(tmp_path.iterdir()) == []
    assert gguf_layer(7, to="gguf") == gguf_layer(7, to="acteng") == 7


def test_bad_files(tmp_path: Path, tiny_llama: acteng.Model, smollm2: acteng.Model) -> None:
    good = acteng.export_gguf(random_vector(tiny_llama, [1, 2]), tmp_path / "good.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(VectorFileError, match="not a readable GGUF"):
        acteng.import_gguf(cut)
    text = tmp_path / "text.gguf"
    text.write_text("hello")
    with pytest.raises(VectorFileError, match="not a readable GGUF"):
        acteng.import_gguf(text)
    model_like = write_gguf(tmp_path / "m.gguf", "llama", {"direction.1": np.ones(8, np.float32)})
    with pytest.raises(VectorFileError, match="architecture 'llama'"):
        acteng.import_gguf(model_like)
    zero = write_gguf(tmp_path / "z.gguf", "controlvector", {"direction.0": np.ones(8, np.float32)})
    with pytest.raises(VectorFileError, match=r"z\.gguf: GGUF direction 0"):
        acteng.import_gguf(zero)
    mixed = write_gguf(
        tmp_path / "w.gguf",
        "controlvector",
        {"direction.1": np.ones(8, np.float32), "direction.2": np.ones(9, np.float32)},
    )
    with pytest.raises(VectorFileError, match="same width"):
        acteng.import_gguf(mixed)
    twice = write_gguf(
        tmp_path / "d.gguf",
        "controlvector",
        {"direction.1": np.ones(8, np.float32), "direction.01": np.ones(8, np.float32)},
    )
    with pytest.raises(VectorFileError, match="duplicate layer 1"):
        acteng.import_gguf(twice)
    odd = write_gguf(tmp_path / "o.gguf", "controlvector", {"weights": np.ones(8, np.float32)})
    with pytest.raises(VectorFileError, match="unexpected tensor 'weights'"):
        acteng.import_gguf(odd)
    with pytest.raises(IncompatibleVectorError, match="width 64 != model width 576"):
        acteng.import_gguf(good, model=smollm2)
