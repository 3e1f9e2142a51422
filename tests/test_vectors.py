"""SteeringVector: algebra, files, validation."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import acteng
from acteng.errors import ConfigError, IncompatibleVectorError, VectorFileError
from tests.helpers import random_vector


def test_algebra(tiny_llama: acteng.Model) -> None:
    v = random_vector(tiny_llama, [1, 2], seed=1)
    w = random_vector(tiny_llama, [2, 3], seed=2)
    torch.testing.assert_close((2 * v)[1], 2 * v[1])
    torch.testing.assert_close((v * 2)[2], 2 * v[2])
    torch.testing.assert_close((-v)[1], -v[1])
    torch.testing.assert_close((v / 4)[1], v[1] / 4)
    total = v + w
    assert total.layers == (1, 2, 3)
    torch.testing.assert_close(total[2], v[2] + w[2])
    torch.testing.assert_close((v - w)[3], -w[3])
    unit = v.normalized()
    assert all(math.isclose(n, 1.0, rel_tol=1e-6) for n in unit.norms().values())
    assert unit.metadata["normalize"] == "unit"
    assert v.select([2]).layers == (2,)
    with pytest.raises(ConfigError, match="no layer"):
        v[0]
    with pytest.raises(ConfigError, match="finite"):
        v * float("nan")


def test_frozen_and_validated() -> None:
    v = acteng.SteeringVector({0: torch.ones(4)})
    with pytest.raises(AttributeError):
        v.metadata = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        v.directions[1] = torch.ones(4)  # type: ignore[index]
    with pytest.raises(ConfigError, match="NaN or inf"):
        acteng.SteeringVector({0: torch.tensor([1.0, float("nan")])})
    with pytest.raises(ConfigError, match="same width"):
        acteng.SteeringVector({0: torch.ones(4), 1: torch.ones(5)})


def test_save_load_roundtrip(tiny_llama: acteng.Model, tmp_path: Path) -> None:
    v = acteng.extract(
        tiny_llama, [("I love this", "I hate this"), ("Great", "Awful")], layers=[1, 3]
    )
    path = v.save(tmp_path / "v.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temp file left
    loaded = acteng.SteeringVector.load(path, model=tiny_llama)
    assert loaded.layers == (1, 3)
    for layer in v.layers:
        torch.testing.assert_close(loaded[layer], v[layer])
    meta = loaded.metadata
    for key in (
        "acteng.version",
        "model",
        "method",
        "read_position",
        "layers",
        "normalize",
        "dataset",
        "created",
    ):
        assert key in meta, key
    assert meta["method"] == "mean_diff" and meta["layers"] == [1, 3]
    assert meta["model"]["hidden_size"] == 64
    assert meta["dataset"]["size"] == 2
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"layers.1", "layers.3"}
        assert f.get_tensor("layers.1").dtype == torch.float32
        assert json.loads(f.metadata()["layers"]) == [1, 3]


def test_bad_files(tiny_llama: acteng.Model, tmp_path: Path) -> None:
    v = random_vector(tiny_llama, [1])
    good = v.save(tmp_path / "good.safetensors")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(VectorFileError, match="truncated"):
        acteng.SteeringVector.load(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.ones(2, 2)}, str(foreign))
    with pytest.raises(VectorFileError, match="not per-layer directions"):
        acteng.SteeringVector.load(foreign)
    nan = tmp_path / "nan.safetensors"
    save_file({"layers.0": torch.tensor([float("nan")] * 64)}, str(nan))
    with pytest.raises(VectorFileError, match="NaN"):
        acteng.SteeringVector.load(nan)
    with pytest.raises(VectorFileError, match="no vector file"):
        acteng.SteeringVector.load(tmp_path / "missing.safetensors")


def test_vector_for_another_model(
    tiny_llama: acteng.Model, smollm2: acteng.Model, tmp_path: Path
) -> None:
    path = random_vector(tiny_llama, [1]).save(tmp_path / "v.safetensors")
    with pytest.raises(IncompatibleVectorError, match="vector width 64 != model width 576"):
        acteng.SteeringVector.load(path, model=smollm2)
    deep = acteng.SteeringVector({20: torch.ones(64)}, {"model": {"num_layers": 30}})
    with pytest.raises(IncompatibleVectorError, match="30 layers") as info:
        deep.check_compatible(tiny_llama)
    assert "do not exist" in str(info.value)


def test_failed_save_keeps_old_file(
    tiny_llama: acteng.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = random_vector(tiny_llama, [1], seed=1).save(tmp_path / "v.safetensors")
    before = path.read_bytes()

    def broken_replace(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        random_vector(tiny_llama, [1], seed=2).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_bad_directions_and_copies() -> None:
    with pytest.raises(ConfigError, match=r"layer numbers \(>= 0\)"):
        acteng.SteeringVector({-1: torch.ones(4)})
    with pytest.raises(ConfigError, match="1-D tensors"):
        acteng.SteeringVector({0: torch.tensor(1.0)})
    with pytest.raises(ConfigError, match="list"):
        acteng.SteeringVector({0: [1.0, 2.0]})  # type: ignore[dict-item]
    source = torch.ones(4)
    v = acteng.SteeringVector({0: source})
    source.fill_(float("nan"))
    assert torch.isfinite(v[0]).all()


def test_integer_directions_become_float_and_complex_are_refused() -> None:
    v = acteng.SteeringVector({0: torch.tensor([3, 4])})
    assert v[0].dtype == torch.float32 and v.norms() == {0: 5.0}
    with pytest.raises(ConfigError, match="real numbers"):
        acteng.SteeringVector({0: torch.tensor([1 + 2j, 3j])})


def test_provenance_follows_algebra(tiny_llama: acteng.Model) -> None:
    v = acteng.extract(tiny_llama, [("good", "bad"), ("nice", "mean")], layers=[1])
    unit = v.normalized()
    tripled = 3 * unit
    assert tripled.metadata["normalize"] is None and tripled.metadata["scale"] == 3.0
    assert unit.normalized().metadata["scale"] is None
    total = v + random_vector(tiny_llama, [1])
    assert total.metadata["method"] == "combination"
    assert [s.get("method") for s in total.metadata["sources"]] == ["mean_diff", "random"]
    assert "dataset" not in total.metadata


def test_saved_file_has_normal_permissions(tiny_llama: acteng.Model, tmp_path: Path) -> None:
    import os

    path = random_vector(tiny_llama, [1]).save(tmp_path / "v.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
