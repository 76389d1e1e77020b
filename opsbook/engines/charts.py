"""Small SVG charts drawn on the server: a page that shows them needs no script, no CDN and no
network (records pages are read offline, from a directory or a bucket).

Every text that reaches the SVG (labels, tooltips, CSS classes) is escaped here; callers pass plain
strings. A chart's colours come from the page's stylesheet through classes (``mark <kind>``), so
a point of a failed run is drawn in the same colour as the word "failed" in a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 420, 150
LEFT, RIGHT, TOP, BOTTOM = 48, 8, 10, 22


@dataclass(frozen=True)
class Point:
    label: str                 # what the x axis says for this point (a day, a start time)
    value: float | None        # None: nothing to draw here (no release that day)
    kind: str = ""             # CSS class of the mark (an outcome: succeeded, failed, ...)
    note: str = ""             # tooltip: what the point is, in words


def number(value: float | None) -> str:
    """A figure as a person reads it: 0, 7, 12.5, 0.25, 1,234."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    v = float(value)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10 or v == int(v):
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _css_class(kind: str) -> str:
    return "".join(ch for ch in kind if ch.isalnum() or ch in "-_")


def chart(points: Sequence[Point], *, title: str, unit: str = "", style: str = "line",
          width: int = WIDTH, height: int = HEIGHT) -> Markup:
    """An SVG chart of `points` in order: ``style="line"`` (a line through the points, each a dot
    coloured by its kind) or ``"bars"``. The y axis starts at 0 (durations, counts, rates)."""
    if style not in ("line", "bars"):
        raise ValueError(f"chart style {style!r}: expected 'line' or 'bars'")
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    values = [p.value for p in points if p.value is not None and not math.isnan(p.value)]
    top = max(values, default=0.0) or 1.0
    n = max(len(points), 1)
    step = plot_w / n

    def x(i: int) -> float:
        return LEFT + step * (i + 0.5)

    def y(v: float) -> float:
        return TOP + plot_h * (1 - v / top)

    parts = [
        f'<svg class="chart" role="img" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{escape(title)}</title>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{width - RIGHT}" y2="{TOP + plot_h}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>',
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + 8}" text-anchor="end">{escape(number(top))}</text>',
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end">0</text>',
    ]
    if unit:
        parts.append(f'<text class="tick unit" x="{LEFT - 4}" y="{TOP + plot_h / 2 + 4}" '
                     f'text-anchor="end">{escape(unit)}</text>')
    if points:
        parts.append(f'<text class="tick" x="{LEFT}" y="{height - 6}">{escape(points[0].label)}</text>')
        if len(points) > 1:
            parts.append(f'<text class="tick" x="{width - RIGHT}" y="{height - 6}" '
                         f'text-anchor="end">{escape(points[-1].label)}</text>')
    if not values:
        parts.append(f'<text class="empty" x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" '
                     f'text-anchor="middle">nothing in this span</text>')
    elif style == "bars":
        bar = max(step * 0.8, 1.0)
        for i, p in enumerate(points):
            if p.value is None or math.isnan(p.value):
                continue
            tip = p.note or f"{p.label}: {number(p.value)} {unit}".rstrip()
            h = max(TOP + plot_h - y(p.value), 1.0)  # a zero is a tick on the axis; no value, no mark
            parts.append(
                f'<rect class="mark {_css_class(p.kind)}" x="{x(i) - bar / 2:.1f}" y="{TOP + plot_h - h:.1f}" '
                f'width="{bar:.1f}" height="{h:.1f}"><title>{escape(tip)}</title></rect>'
            )
    else:
        drawn = [(i, p) for i, p in enumerate(points) if p.value is not None and not math.isnan(p.value)]
        line = " ".join(f"{x(i):.1f},{y(p.value):.1f}" for i, p in drawn)  # type: ignore[arg-type]
        parts.append(f'<polyline class="line" points="{line}"/>')
        radius = 3 if len(points) <= 60 else 2
        for i, p in drawn:
            tip = p.note or f"{p.label}: {number(p.value)} {unit}".rstrip()
            parts.append(
                f'<circle class="mark {_css_class(p.kind)}" cx="{x(i):.1f}" cy="{y(p.value):.1f}" '  # type: ignore[arg-type]
                f'r="{radius}"><title>{escape(tip)}</title></circle>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every text above went through escape()
