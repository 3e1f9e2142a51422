"""What a backend does: the two shapes of heavy work acteng hands out.

- `Backend.map(model, fn, items)`: ``fn(model, item)`` for every item, results in input
  order (recording batches, the parts of an evaluation). Items are independent.
- `Backend.pool(model, factory)`: workers that each hold ``factory(model)`` (a scorer with
  its unsteered references computed once) and take calls on it for the length of a block.

Callers pass their own functions and factories in, so this package knows nothing of what
is computed: recording, scoring and evaluation live above it and only call these. On a
remote backend the functions, factories, items and results travel by cloudpickle (as Ray
sends task arguments), so they must be plain data and functions that need nothing of the
calling process (no open files, no locks).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from acteng.models import Model

__all__ = ["Backend", "Pool"]

T = TypeVar("T")
R = TypeVar("R")
W = TypeVar("W")
W_co = TypeVar("W_co", covariant=True)


class Pool(Protocol[W_co]):
    """Workers that each hold one value built by the pool's factory (see `Backend.pool`)."""

    @property
    def here(self) -> W_co | None:
        """The one worker's value when it lives in this process, else None: a caller may
        then use it directly (e.g. to report progress from inside a call)."""
        ...

    def call_one(self, fn: Callable[[W_co], R]) -> R:
        """``fn(value)`` on one worker (for what every worker holds alike)."""
        ...

    def map(self, fn: Callable[[W_co, T], R], items: Sequence[T]) -> Iterator[R]:
        """``fn(value, item)`` for every item, spread over the workers, in input order."""
        ...


@runtime_checkable
class Backend(Protocol):
    """Where heavy loops run: `acteng.backends.local.LocalBackend` (this process) or
    `acteng.RayBackend` (a Ray cluster). Both give the same results."""

    def session(self) -> AbstractContextManager[None]:
        """Hold the backend's resources (a cluster connection) over a block of calls, so
        the steps inside share them instead of each setting up its own."""
        ...

    def map(
        self,
        model: Model,
        fn: Callable[[Model, T], R],
        items: Sequence[T],
        *,
        progress: str | None = None,
    ) -> Generator[R]:
        """``fn(model, item)`` for every item, in input order; `progress` labels a progress
        bar (None: no bar). Closing the generator early stops the remaining work."""
        ...

    def pool(self, model: Model, factory: Callable[[Model], W]) -> AbstractContextManager[Pool[W]]:
        """A pool of workers, each holding ``factory(model)``, for the length of a block."""
        ...
