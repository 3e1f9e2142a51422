"""The local backend: every call runs in this process, one after another (the default)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from acteng.models import Model

__all__ = ["LocalBackend", "LocalPool"]

T = TypeVar("T")
R = TypeVar("R")
W = TypeVar("W")


class LocalPool(Generic[W]):
    """One worker, in this process: its value is `here`."""

    def __init__(self, value: W) -> None:
        self._value = value

    @property
    def here(self) -> W:
        return self._value

    def call_one(self, fn: Callable[[W], R]) -> R:
        return fn(self._value)

    def map(self, fn: Callable[[W, T], R], items: Sequence[T]) -> Iterator[R]:
        for item in items:
            yield fn(self._value, item)


@dataclass(frozen=True)
class LocalBackend:
    """Runs `map` and `pool` in this process (see `acteng.backends.base.Backend`).

    >>> backend = LocalBackend()
    >>> list(backend.map(model, lambda m, text: len(text), ["a", "bc"]))
    [1, 2]
    """

    def session(self) -> nullcontext[None]:
        return nullcontext()

    def map(
        self,
        model: Model,
        fn: Callable[[Model, T], R],
        items: Sequence[T],
        *,
        progress: str | None = None,
    ) -> Generator[R]:
        bar = _progress_bar(len(items), progress)
        try:
            for item in items:
                yield fn(model, item)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    @contextmanager
    def pool(self, model: Model, factory: Callable[[Model], W]) -> Iterator[LocalPool[W]]:
        yield LocalPool(factory(model))


def _progress_bar(total: int, label: str | None) -> Any:
    if label is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="batch", leave=False)
