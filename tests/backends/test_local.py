"""The backend interface in this process: `resolve_backend`, `LocalBackend.map` and
`LocalBackend.pool` (the Ray implementation is checked against it in test_ray.py)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

import acteng
from acteng.backends import Backend, LocalBackend, resolve_backend
from acteng.errors import ConfigError, MissingExtraError

MODEL = acteng.Model.__new__(acteng.Model)  # never used by the functions below


def _length(model: acteng.Model, text: str) -> int:
    return len(text)


def test_names_and_instances_resolve() -> None:
    assert resolve_backend("local") == LocalBackend()
    assert resolve_backend(LocalBackend()) == LocalBackend()
    ray = acteng.RayBackend(workers=2)
    if importlib.util.find_spec("ray") is not None:
        assert resolve_backend(ray) is ray
        assert resolve_backend("ray") == acteng.RayBackend()
    assert isinstance(LocalBackend(), Backend) and isinstance(ray, Backend)
    with pytest.raises(ConfigError, match="unknown backend 'spark'"):
        resolve_backend("spark")
    with pytest.raises(ConfigError, match="unknown backend 3"):
        resolve_backend(3)  # type: ignore[arg-type]


def test_a_ray_backend_needs_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(MissingExtraError, match=r"pip install 'acteng\[ray\]'"):
        resolve_backend(acteng.RayBackend())
    assert resolve_backend("local") == LocalBackend()


def test_map_keeps_input_order_and_stops_when_closed() -> None:
    assert list(LocalBackend().map(MODEL, _length, ["abc", "", "de"])) == [3, 0, 2]
    calls: list[str] = []

    def record(model: acteng.Model, text: str) -> str:
        calls.append(text)
        return text

    results = LocalBackend().map(MODEL, record, ["a", "b", "c"])
    assert next(results) == "a"
    results.close()
    assert calls == ["a"]  # nothing after the close runs


def test_map_progress_bar_counts_the_items(monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm.auto

    bars: list[tuple[int, str, list[int]]] = []

    class Bar:
        def __init__(self, total: int, desc: str, **_: object) -> None:
            bars.append((total, desc, []))

        def update(self, n: int) -> None:
            bars[-1][2].append(n)

        def close(self) -> None:
            bars[-1][2].append(-1)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    assert list(LocalBackend().map(MODEL, _length, ["a", "bb"], progress="counting")) == [1, 2]
    assert bars == [(2, "counting", [1, 1, -1])]
    list(LocalBackend().map(MODEL, _length, ["a"]))
    assert len(bars) == 1  # no label, no bar


def test_pool_holds_one_value_built_here() -> None:
    built: list[acteng.Model] = []

    def factory(model: acteng.Model) -> dict[str, int]:
        built.append(model)
        return {"offset": 10}

    with LocalBackend().pool(MODEL, factory) as pool:
        assert pool.here == {"offset": 10}
        assert pool.call_one(lambda value: value["offset"]) == 10
        mapped: Iterator[int] = pool.map(lambda value, x: value["offset"] + x, [1, 2, 3])
        assert list(mapped) == [11, 12, 13]
    assert built == [MODEL]  # the factory ran once


def test_session_is_a_no_op() -> None:
    with LocalBackend().session():
        pass
