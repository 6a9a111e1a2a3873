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


def nice_top(peak: int) -> int:
    """The y axis' top: 1, 2 or 5 times a power of ten at or above the peak (at least 4,
    so a quiet day still gets four whole-number ticks)."""
    if peak <= 4:
        return 4
    power = 10 ** int(math.floor(math.log10(peak)))
    for factor in (1, 2, 5, 10):
        if factor * power >= peak:
            return factor * power
    return 10 * power


def _class(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:40]


def line_chart(chart_id: str, title: str, labels: Sequence[str], series: Sequence[Series],
               *, label_every: int = 1) -> Markup:
    """One line per series over the buckets; x labels every `label_every` buckets. The
    figure is an <svg role="img"> named by its <title>; the numbers are in a table beside
    it for screen readers and copying."""
    count = min(len(labels), MAX_POINTS)
    peak = max((max(s.values[:count], default=0) for s in series), default=0)
    top = nice_top(int(peak))
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
    for tick in range(5):  # the y axis: 0, 1/4 ... top, with grid lines
        value = top * tick / 4
        parts.append(f'<line class="grid" x1="{LEFT}" y1="{y(value):.1f}" '
                     f'x2="{WIDTH - RIGHT}" y2="{y(value):.1f}"/>')
        shown = f"{value:.0f}" if value == int(value) else f"{value:.1f}"
        parts.append(f'<text class="tick" x="{LEFT - 6}" y="{y(value) + 4:.1f}" '
                     f'text-anchor="end">{shown}</text>')
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
