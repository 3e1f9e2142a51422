"""`ServeSettings`: what a served app and its engine are built from, as plain typed values.

``acteng serve`` turns its flags into one (argparse stays in `acteng.cli`); the
transformers engine, the Ray Serve replicas (`acteng.server.replicas`) and the vLLM engine
(`acteng.vllm_engine.serving`) are all built from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from acteng.server.requests import Limits

__all__ = ["ServeSettings"]


@dataclass(frozen=True)
class ServeSettings:
    """What ``acteng serve`` builds its engine and app from (its flags)."""

    slots: int = 16
    context: int = 1024
    max_queue: int = 256
    fixed_batch: bool = True
    max_tokens: int = 512
    home: str | None = None  # the vector library folder; None: $ACTENG_HOME
    api_key: str | None = None
    admin_key: str | None = None  # needed to upload or delete vectors over HTTP
    guard: dict[str, Any] | None = None  # the default guard, in the request's JSON form
    guard_required: bool = False  # requests may not change or turn off the default guard
    allowed_hosts: tuple[str, ...] | None = None  # Host names answered; None: any

    @property
    def limits(self) -> Limits:
        """What one request may ask for under these settings."""
        return Limits(max_tokens=self.max_tokens, context=self.context)

    def app_options(self) -> dict[str, Any]:
        """`acteng.server.app.create_app`'s keyword arguments under these settings."""
        return {
            "api_key": self.api_key,
            "admin_key": self.admin_key,
            "limits": self.limits,
            "default_guard": self.guard,
            "guard_required": self.guard_required,
            "allowed_hosts": self.allowed_hosts,
        }
