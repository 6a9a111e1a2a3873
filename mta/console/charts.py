"""Charts as SVG drawn on the server: no script, no style attribute (the CSP's default-src
'self' blocks inline styles), only geometry and class names that console.css colours.
Every text put into the SVG is escaped; the numbers are ints we counted."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from markupsafe import Markup, escape

WIDTH, HEIGHT = 960, 280
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 40  # room for the axis labels
MAX_POINTS = 400
SVG_NS = "http://www.w3.org/2000/svg"  # buckets drawn (Operations caps them too)


@dataclass(frozen=True)
class Series:
    name: str  # a class name part: [a-z_]+ (the overview's SERIES keys)
    label: str  # what the legend says (translated)
    values: Sequence[int]


def scale(peak: int) -> tuple[int, int]:
    """(top, step) of the y axis: whole-number ticks `step` apart (1, 2 or 5 times a power
    of ten), at most five of them above 0, the top the first tick at or over the peak."""
    peak = max(int(peak), 4)  # a quiet period still gets ticks 0..4
    step = 1
    while step * 5 < peak:
        for factor in (2, 5 / 2, 2):  # 1 -> 2 -> 5 -> 10 -> 20 ...
            step = int(step * factor)
            if step * 5 >= peak:
                break
    return step * math.ceil(peak / step), step


def _class(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:40]


def line_chart(chart_id: str, title: str, labels: Sequence[str], series: Sequence[Series],
               *, label_every: int = 1) -> Markup:
    """One line per series over the buckets; x labels every `label_every` buckets. The
    figure is an <svg role="img"> named by its <title>; the numbers are in a table beside
    it for screen readers and copying."""
    count = min(len(labels), MAX_POINTS)
    peak = max((max(s.values[:count], default=0) for s in series), default=0)
    top, tick_step = scale(int(peak))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, count - 1)

    def x(i: int) -> float:
        return LEFT + (i * step if count > 1 else plot_w / 2)

    def y(value: float) -> float:
        return TOP + plot_h - plot_h * value / top

    cid = _class(chart_id)
    parts = [f'<svg xmlns="{SVG_NS}" id="{cid}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}"'
             f' width="{WIDTH}" height="{HEIGHT}" role="img" aria-labelledby="{cid}-title">',
             f'<title id="{cid}-title">{escape(title)}</title>']
    for value in range(0, top + 1, tick_step):  # the y axis, with grid lines
        parts.append(f'<line class="grid" x1="{LEFT}" y1="{y(value):.1f}" '
                     f'x2="{WIDTH - RIGHT}" y2="{y(value):.1f}"/>')
        parts.append(f'<text class="tick" x="{LEFT - 6}" y="{y(value) + 4:.1f}" '
                     f'text-anchor="end">{value}</text>')
    every = max(1, label_every)
    for i in range(0, count, every):
        parts.append(f'<text class="tick" x="{x(i):.1f}" y="{HEIGHT - BOTTOM + 16}" '
                     f'text-anchor="middle">{escape(labels[i])}</text>')
    for item in series:
        values = list(item.values[:count])
        name = _class(item.name)
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        parts.append(f'<polyline class="line series-{name}" points="{points}">'
                     f'<title>{escape(item.label)}: {sum(values)}</title></polyline>')
        # A dot on each bucket that has any: a lone busy hour is seen, not only a slope.
        parts.extend(f'<circle class="dot series-{name}" cx="{x(i):.1f}" cy="{y(v):.1f}" '
                     f'r="3"><title>{escape(labels[i])} {escape(item.label)}: {v}</title>'
                     '</circle>' for i, v in enumerate(values) if v)
    parts.append("</svg>")
    return Markup("".join(parts))


def legend(series: Sequence[Series]) -> Markup:
    """The colour key, as a list (each swatch an inline SVG square with the series class)."""
    items = []
    for item in series:
        name = _class(item.name)
        items.append(f'<li><svg class="swatch" width="12" height="12" aria-hidden="true">'
                     f'<rect class="series-{name}" width="12" height="12"/></svg> '
                     f'{escape(item.label)}: {sum(item.values)}</li>')
    return Markup(f'<ul class="legend">{"".join(items)}</ul>')
