"""The vector library: operations, names, two writers at once, broken entries."""

import json
import multiprocessing
import sqlite3
from pathlib import Path

import pytest
import torch

import acteng
from acteng.errors import ConfigError
from acteng.library import LibraryError, VectorLibrary
from tests.conftest import random_vector


@pytest.fixture()
def lib(tmp_path: Path) -> VectorLibrary:
    return VectorLibrary(tmp_path / "home")


def test_add_list_show_load_rename_remove(lib: VectorLibrary, tiny_llama: acteng.Model) -> None:
    v = acteng.extract(tiny_llama, [("good", "bad"), ("kind", "cruel")], layers=[1, 2])
    entry = lib.add("happy", v, tags=["sentiment", "demo"])
    assert entry.layers == [1, 2] and entry.method == "mean_diff" and entry.hidden_size == 64
    assert entry.model == "tiny-llama" and entry.dataset_hash == v.metadata["dataset"]["sha256"]
    assert [e.name for e in lib.list()] == ["happy"]
    assert [e.name for e in lib.list(tag="demo")] == ["happy"] and lib.list(tag="x") == []
    loaded = lib.load("happy", model=tiny_llama)
    torch.testing.assert_close(loaded[1], v[1])
    lib.set_card("happy", {"effect": 0.4, "tax": 0.01})
    assert lib.get("happy").card == {"effect": 0.4, "tax": 0.01}
    lib.rename("happy", "joy")
    assert "joy" in lib and "happy" not in lib
    lib.add("joy2", v)  # same content: one file, two names
    assert len(list(lib.files.iterdir())) == 1
    lib.remove("joy")
    assert len(list(lib.files.iterdir())) == 1  # still used by joy2
    lib.remove("joy2")
    assert list(lib.files.iterdir()) == [] and lib.list() == []


def test_names_and_conflicts(lib: VectorLibrary, tiny_llama: acteng.Model, tmp_path: Path) -> None:
    v = random_vector(tiny_llama, [1])
    for bad in ("../evil", "a/b", "", " x", ".hidden", "x" * 65, "a\\b"):
        with pytest.raises(ConfigError, match="invalid vector name"):
            lib.add(bad, v)
    lib.add("x", v)
    with pytest.raises(LibraryError, match="already exists"):
        lib.add("x", v)
    lib.add("x", 2 * v, overwrite=True)
    torch.testing.assert_close(lib.load("x")[1], 2 * v[1])
    with pytest.raises(LibraryError, match=r"no vector named 'nope'.*known: x"):
        lib.load("nope")
    lib.add("y", v)
    with pytest.raises(LibraryError, match="'y' exists"):
        lib.rename("x", "y")
    path = v.save(tmp_path / "v.safetensors")
    assert lib.add("from-file", path).layers == [1]


def test_broken_entries_are_named(lib: VectorLibrary, tiny_llama: acteng.Model) -> None:
    lib.add("gone", random_vector(tiny_llama, [1], seed=1))
    lib.add("changed", random_vector(tiny_llama, [1], seed=2))
    lib.add("fine", random_vector(tiny_llama, [1], seed=3))
    lib.get("gone").path.unlink()
    changed = lib.get("changed").path
    changed.write_bytes(changed.read_bytes()[:-8] + b"\0" * 8)
    problems = {e.name: e.problem for e in lib.list()}
    assert problems["fine"] is None and "missing" in (problems["gone"] or "")
    with pytest.raises(LibraryError, match=r"'gone' is broken.*missing"):
        lib.load("gone")
    with pytest.raises(LibraryError, match=r"'changed' is broken.*changed"):
        lib.load("changed")
    assert lib.load("fine").layers == (1,)


def test_corrupt_index_is_a_clear_error(lib: VectorLibrary, tiny_llama: acteng.Model) -> None:
    lib.add("a", random_vector(tiny_llama, [1]))
    lib.index.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LibraryError, match=r"unreadable.*move it aside"):
        lib.list()


def _add_many(home: str, prefix: str, count: int) -> None:
    library = VectorLibrary(home)
    for i in range(count):
        v = acteng.SteeringVector({1: torch.full((16,), float(i) + (0.5 if prefix == "b" else 0))})
        library.add(f"{prefix}{i}", v, tags=[prefix])


def test_two_processes_adding_at_once(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_add_many, args=(home, p, 25)) for p in ("a", "b")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    lib = VectorLibrary(home)
    names = {e.name for e in lib.list()}
    assert names == {f"{p}{i}" for p in "ab" for i in range(25)}
    assert all(e.problem is None for e in lib.list())
    assert lib.load("b3")[1][0] == 3.5
    with sqlite3.connect(lib.index) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert not list((Path(home) / "tmp").iterdir())
    assert json.loads(json.dumps([e.to_json() for e in lib.list()]))
