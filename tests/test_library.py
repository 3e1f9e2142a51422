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
from tests.helpers import random_vector


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
    for bad in ("../evil", "a/b", "", " x", ".hidden", "x" * 65, "a\\b", "v.safetensors"):
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
    files = list(lib.files.iterdir())
    assert len(files) == 50 and not [f for f in files if f.name.startswith(".")]
    assert json.loads(json.dumps([e.to_json() for e in lib.list()]))


def test_crash_safe_removal_and_repairs(lib: VectorLibrary, tiny_llama: acteng.Model) -> None:
    v, w = random_vector(tiny_llama, [1], seed=1), random_vector(tiny_llama, [1], seed=2)
    # a fixed creation time: otherwise each add stamps its own second, and two adds that
    # straddle a second boundary store different contents (the test flaked on that)
    v = acteng.SteeringVector(dict(v.directions), {**v.metadata, "created": "2026-01-01"})
    lib.add("a", v)
    lib.add("b", v)  # shares a's file
    shared = lib.get("a").path
    assert lib.get("b").path == shared
    shared.write_bytes(b"garbage")
    assert {e.name: bool(e.problem) for e in lib.list()} == {"a": True, "b": True}
    lib.remove("a")
    lib.add("a", v)  # re-adding rewrites the shared file: both entries are whole again
    assert all(e.problem is None for e in lib.list())
    lib.add("a", w, overwrite=True)  # b still uses the old file, so it stays
    assert len(list(lib.files.iterdir())) == 2
    lib.add("b", w, overwrite=True)  # now nothing uses it: swept
    assert len(list(lib.files.iterdir())) == 1
    orphan = lib.files / ("0" * 64 + ".safetensors")  # as left by a crash after the commit
    orphan.write_bytes(b"x")
    lib.remove("b")
    assert not orphan.exists()


def test_missing_names_and_self_rename(lib: VectorLibrary, tiny_llama: acteng.Model) -> None:
    lib.add("x", random_vector(tiny_llama, [1]))
    assert lib.rename("x", "x").name == "x"
    for action in (
        lambda: lib.remove("nope"),
        lambda: lib.rename("nope", "z"),
        lambda: lib.set_card("nope", {}),
    ):
        with pytest.raises(LibraryError, match="no vector named 'nope'"):
            action()


def test_busy_library_says_retry(lib: VectorLibrary, tiny_llama: acteng.Model) -> None:
    lib.add("x", random_vector(tiny_llama, [1]))
    quick = VectorLibrary(lib.home, timeout=0.1)
    holder = sqlite3.connect(lib.index, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(LibraryError, match=r"busy.*retry"):
            quick.add("y", random_vector(tiny_llama, [1]))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "y" not in lib


def test_threads_adding_the_same_name(lib: VectorLibrary, tiny_llama: acteng.Model) -> None:
    import threading

    errors: list[BaseException] = []

    def add(seed: int) -> None:
        try:
            lib.add("same", random_vector(tiny_llama, [1], seed=seed), overwrite=True)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [e.name for e in lib.list()] == ["same"] and lib.list()[0].problem is None
    assert len(list(lib.files.iterdir())) == 1
