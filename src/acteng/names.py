"""What a vector's library name may be: its pattern, and the reserved bundled names.

Names travel through the CLI, HTTP requests and the library index, never as paths. The
names of the vectors bundled with acteng are reserved: a library entry must not shadow
what acteng ships (a client could otherwise replace the detector a server's guard relies
on), so lookups of a bundled name always mean the bundled file.
"""

from __future__ import annotations

import re

from acteng.bundled import bundled_files
from acteng.errors import ConfigError, LibraryError

__all__ = ["NAME_PATTERN", "refuse_bundled_name", "validate_name"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_name(name: str) -> str:
    """A library name: 1-64 of letters, digits, '.', '_', '-', starting alphanumeric."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None or name in (".", ".."):
        raise ConfigError(
            f"invalid vector name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no paths or spaces)"
        )
    if name.lower().endswith((".safetensors", ".gguf")):
        # Commands take a file path or a name in the same place: keep them apart.
        raise ConfigError(
            f"invalid vector name {name!r}: it looks like a file name; drop the extension"
        )
    return name


def refuse_bundled_name(name: str) -> None:
    """Refuse `name` for a library entry if acteng bundles a vector of that name."""
    if name in bundled_files():
        raise LibraryError(
            f"{name!r} is the name of a vector bundled with acteng; bundled names "
            f"({', '.join(sorted(bundled_files()))}) are reserved: choose another name"
        )
