"""What the engines and a request's row share: the submitted `Job` and the `Event`s it gets.

Kept apart from the engine so that `acteng.server.rows` (which sends events) and the
engines (which create jobs and run rows) both import downward, never each other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from acteng.server.requests import GenerationRequest

__all__ = ["Event", "Job", "Sink"]


@dataclass
class Event:
    """What the engine tells a waiting request: new text, the end, or an error.

    kind: "token" (text + tokens + per-token monitor scores), "done" (finish reason and
    the summary), or "error" (status and message).
    """

    kind: str
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)
    finish_reason: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    status: int = 200


Sink = Callable[[Event], None]


class Job:
    """One submitted request: its sink for events and a cancel flag read between steps."""

    def __init__(self, request: GenerationRequest, sink: Sink) -> None:
        self.request = request
        self.sink = sink
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """Stop generating for this job; its slot is freed at the next step boundary."""
        self.cancelled.set()
