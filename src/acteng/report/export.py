"""Figures to SVG text and files: one form for the CLI's files and the HTML report's inline
figures.

The text is deterministic (the same figure gives the same bytes on every run, so files
diff cleanly and tests can compare them): no date or creator metadata, and matplotlib's
element ids are hashed with a fixed salt. Text stays text (`svg.fonttype = none`), so
labels are searchable and small. The XML prolog and DOCTYPE are left out and markers use
SVG 2's plain ``href``, so the same text is a valid SVG file and can be pasted into HTML as
is, with no namespace or DTD address that looks like a link.

    fig = frontier_chart(result.cells, "sentiment", 0.05)
    save_figure(fig, "plots/frontier.svg")
    html = f"<div>{figure_svg(fig)}</div>"
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from acteng.vectors import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["figure_svg", "save_figure", "save_figures"]

# Without these keys' defaults the file carries the date and a link to matplotlib.org.
_NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}
_XLINK_USE = re.compile(r"<(use|image) xlink:href=")
_XLINK_NAMESPACE = ' xmlns:xlink="http://www.w3.org/1999/xlink"'


def figure_svg(fig: Figure) -> str:
    """The figure as SVG text, starting at ``<svg``; its label (set by the figure
    functions to the title) becomes the SVG's ``<title>`` for screen readers and tooltips."""
    import matplotlib

    buffer = io.StringIO()
    # a fixed salt: the ids matplotlib hashes (clip paths, markers) are the same every run
    with matplotlib.rc_context({"svg.hashsalt": "acteng", "svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", metadata=_NO_METADATA)
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = _XLINK_USE.sub(r"<\1 href=", text)
    if "xlink:" not in text:  # nothing uses the namespace any more: drop its declaration
        text = text.replace(_XLINK_NAMESPACE, "", 1)
    label = str(fig.get_label() or "")
    if label:
        head_end = text.index(">") + 1
        text = f"{text[:head_end]}\n <title>{escape(label)}</title>{text[head_end:]}"
    return text


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write the figure as an SVG file, atomically (a reader never sees half a file)."""
    target = Path(path)
    atomic_write_bytes(target, figure_svg(fig).encode())
    return target


def save_figures(figures: Mapping[str, Figure], folder: str | Path) -> list[Path]:
    """Write each figure as ``folder/<key>.svg`` (the folder is made if needed); returns
    the paths in the mapping's order."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    return [save_figure(fig, root / f"{stem}.svg") for stem, fig in figures.items()]
