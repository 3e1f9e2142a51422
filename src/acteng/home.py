"""acteng's folders on disk: the user data home (the vector library) and the cache.

Both follow the platform's conventions and can be moved with an environment variable:
``$ACTENG_HOME`` and ``$ACTENG_CACHE``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["cache_dir", "default_home"]


def default_home() -> Path:
    """``$ACTENG_HOME``, else the platform's user data folder for acteng."""
    env = os.environ.get("ACTENG_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "acteng"


def cache_dir() -> Path:
    """acteng's cache folder: ``$ACTENG_CACHE``, else ``$XDG_CACHE_HOME/acteng``."""
    env = os.environ.get("ACTENG_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "acteng"
