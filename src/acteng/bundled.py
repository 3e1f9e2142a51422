"""Where the detectors and vectors shipped with acteng for the default model are found.

Names resolve wherever a vector or detector name is accepted, after files and library
entries. How each file is built is `acteng.recipes`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["FOLDER", "bundled_files"]

FOLDER = Path(__file__).parent / "data" / "bundled"


def bundled_files() -> dict[str, Path]:
    """Shipped files by name."""
    return {p.stem: p for p in sorted(FOLDER.glob("*.safetensors"))}
