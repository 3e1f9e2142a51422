"""Plots as standalone SVG text: heatmaps and x-y charts, with no plotting dependency.

SVG keeps the install small, scales cleanly, and embeds directly in the self-contained
HTML report (`acteng demo`). Every chart has a title and labelled axes; heatmaps carry a
colour bar and, when the grid is small enough to read, the value in each cell. Missing
values (None or NaN) are drawn as hatched grey cells, never as a colour that means a value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

from acteng.vectors import atomic_write_bytes

__all__ = ["Series", "heatmap", "save_svg", "xy_chart"]

# Colour-blind-safe categorical palette (Okabe-Ito).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
# Sequential (viridis stops) and diverging (blue - white - red) colour maps.
_SEQUENTIAL = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_DIVERGING = ((33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43))
_FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'


@dataclass(frozen=True)
class Series:
    """One named set of (x, y) points, drawn as a line with markers or as markers alone."""

    name: str
    points: Sequence[tuple[float, float]]
    lines: bool = True
    color: str | None = None
    markers: bool = True


def _is_missing(value: float | None) -> bool:
    return value is None or not math.isfinite(value)


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000 or magnitude < 0.01:
        return f"{value:.2g}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _tick_label(value: float) -> str:
    return f"{round(value, 10):g}"


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw), default=raw)
    start = math.floor(low / step) * step
    ticks, value = [], start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _colour(t: float, stops: Sequence[tuple[int, int, int]]) -> str:
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    rgb = [round(a + (b - a) * f) for a, b in zip(stops[i], stops[i + 1], strict=True)]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _ink(background: str) -> str:
    r, g, b = (int(background[i : i + 2], 16) for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def _text(x: float, y: float, text: str, size: int = 12, **attrs: str) -> str:
    extra = " ".join(f'{k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" {_FONT} {extra}>{escape(text)}</text>'


def _frame(width: float, height: float, title: str, body: list[str]) -> str:
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{escape(title)}">',
            f"<title>{escape(title)}</title>",
            '<rect width="100%" height="100%" fill="#fff"/>',
            _text(width / 2, 22, title, 15, text_anchor="middle", font_weight="bold"),
            *body,
            "</svg>",
        ]
    )


def heatmap(
    values: Sequence[Sequence[float | None]],
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar: str,
    diverging: bool = False,
    annotate: bool | None = None,
) -> str:
    """A grid of coloured cells, rows top to bottom; `diverging` centres the scale on 0."""
    if len(values) != len(rows) or any(len(r) != len(cols) for r in values):
        raise ValueError(f"heatmap values must be {len(rows)} rows x {len(cols)} columns")
    present = [float(v) for r in values for v in r if v is not None and math.isfinite(v)]
    low, high = (min(present), max(present)) if present else (0.0, 1.0)
    if diverging:
        reach = max(abs(low), abs(high)) or 1.0
        low, high = -reach, reach
    elif high == low:
        high = low + 1.0
    stops = _DIVERGING if diverging else _SEQUENTIAL
    cell_w = max(28, min(64, 560 // max(len(cols), 1)))
    cell_h = max(18, min(36, 420 // max(len(rows), 1)))
    left, top = 90, 40
    grid_w, grid_h = cell_w * len(cols), cell_h * len(rows)
    # wide enough for the title even when the grid is small
    width, height = max(left + grid_w + 110, 9 * len(title) + 40), top + grid_h + 60
    show = annotate if annotate is not None else len(cols) <= 14 and cell_h >= 18
    body = [
        '<defs><pattern id="missing" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#ddd"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#aaa" stroke-width="2"/></pattern></defs>'
    ]
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            x, y = left + j * cell_w, top + i * cell_h
            if _is_missing(value):
                body.append(
                    f'<rect x="{x}" y="{y}" width="{cell_w}" height="{cell_h}" '
                    'fill="url(#missing)"><title>no value</title></rect>'
                )
                continue
            assert value is not None  # _is_missing ruled it out
            v = float(value)
            fill = _colour((v - low) / (high - low), stops)
            body.append(
                f'<rect x="{x}" y="{y}" width="{cell_w}" height="{cell_h}" fill="{fill}">'
                f"<title>{escape(f'{ylabel} {rows[i]}, {xlabel} {cols[j]}: {v:.4g}')}</title>"
                "</rect>"
            )
            if show:
                body.append(
                    _text(
                        x + cell_w / 2,
                        y + cell_h / 2 + 4,
                        _fmt(v),
                        10,
                        text_anchor="middle",
                        fill=_ink(fill),
                    )
                )
    for i, name in enumerate(rows):
        body.append(_text(left - 6, top + i * cell_h + cell_h / 2 + 4, name, 11, text_anchor="end"))
    for j, name in enumerate(cols):
        body.append(
            _text(left + j * cell_w + cell_w / 2, top + grid_h + 16, name, 11, text_anchor="middle")
        )
    body.append(_text(left + grid_w / 2, top + grid_h + 40, xlabel, 12, text_anchor="middle"))
    mid_y = top + grid_h / 2
    body.append(
        _text(18, mid_y, ylabel, 12, text_anchor="middle", transform=f"rotate(-90 18 {mid_y})")
    )
    # colour bar
    bar_x, bar_h = left + grid_w + 24, max(grid_h, 80)
    for k in range(50):
        t = 1 - k / 50
        body.append(
            f'<rect x="{bar_x}" y="{top + k * bar_h / 50:.1f}" width="14" '
            f'height="{bar_h / 50 + 0.5:.1f}" fill="{_colour(t, stops)}"/>'
        )
    for tick in _ticks(low, high, 5):
        if low <= tick <= high:
            tick_y = top + (1 - (tick - low) / (high - low)) * bar_h
            body.append(_text(bar_x + 18, tick_y + 4, _tick_label(tick), 10))
    bar_mid = top + bar_h / 2
    body.append(
        _text(
            bar_x + 78,
            bar_mid,
            colorbar,
            11,
            text_anchor="middle",
            transform=f"rotate(-90 {bar_x + 78} {bar_mid})",
        )
    )
    return _frame(width, max(height, top + bar_h + 20), title, body)


def xy_chart(
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: Sequence[tuple[float, str]] = (),
    vlines: Sequence[tuple[float, str]] = (),
    width: int = 640,
    height: int = 380,
) -> str:
    """Lines and/or markers on linear axes, with a legend; `hlines`/`vlines` mark
    reference values (a budget, chance level) with a dashed line and a label."""
    points = [
        (x, y) for s in series for x, y in s.points if not _is_missing(x) and not _is_missing(y)
    ]
    xs = [x for x, _ in points] + [v for v, _ in vlines]
    ys = [y for _, y in points] + [v for v, _ in hlines]
    xt = _ticks(min(xs, default=0.0), max(xs, default=1.0))
    yt = _ticks(min(ys, default=0.0), max(ys, default=1.0))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    left, right, top, bottom = 70, 170, 40, 56
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    body = [
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>'
    ]
    for t in xt:
        body.append(
            f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" y2="{top + plot_h}" '
            'stroke="#eee"/>'
        )
        body.append(_text(px(t), top + plot_h + 16, _tick_label(t), 11, text_anchor="middle"))
    for t in yt:
        body.append(
            f'<line x1="{left}" y1="{py(t):.1f}" x2="{left + plot_w}" y2="{py(t):.1f}" '
            'stroke="#eee"/>'
        )
        body.append(_text(left - 6, py(t) + 4, _tick_label(t), 11, text_anchor="end"))
    for value, label in hlines:
        body.append(
            f'<line x1="{left}" y1="{py(value):.1f}" x2="{left + plot_w}" y2="{py(value):.1f}" '
            'stroke="#888" stroke-dasharray="5 4"/>'
        )
        body.append(_text(left + plot_w - 4, py(value) - 4, label, 10, text_anchor="end"))
    for value, label in vlines:
        body.append(
            f'<line x1="{px(value):.1f}" y1="{top}" x2="{px(value):.1f}" y2="{top + plot_h}" '
            'stroke="#888" stroke-dasharray="5 4"/>'
        )
        body.append(_text(px(value) + 4, top + 12, label, 10))
    for k, s in enumerate(series):
        colour = s.color or PALETTE[k % len(PALETTE)]
        pts = [(px(x), py(y)) for x, y in s.points if not _is_missing(x) and not _is_missing(y)]
        if s.lines and len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            body.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
        for x, y in pts if s.markers else []:
            body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"/>')
        ly = top + 12 + 18 * k
        lx = left + plot_w + 14
        body.append(
            f'<rect x="{lx}" y="{ly - 9}" width="12" height="12" fill="{colour}"/>'
            if s.markers
            else f'<line x1="{lx}" y1="{ly - 3}" x2="{lx + 12}" y2="{ly - 3}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        body.append(_text(left + plot_w + 32, ly + 1, s.name[:22], 11))
    body.append(_text(left + plot_w / 2, height - 14, xlabel, 12, text_anchor="middle"))
    mid_y = top + plot_h / 2
    body.append(
        _text(18, mid_y, ylabel, 12, text_anchor="middle", transform=f"rotate(-90 18 {mid_y})")
    )
    return _frame(width, height, title, body)


def save_svg(svg: str, path: str | Path) -> Path:
    """Write an SVG atomically (a reader never sees half a file); returns the path."""
    target = Path(path)
    atomic_write_bytes(target, svg.encode())
    return target
