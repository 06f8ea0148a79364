"""Server-rendered SVG charts (no JavaScript library, no build step): the geometry is computed here and
drawn by the `bar_chart` macro of templates/macros.html. Each chart comes with its numbers as a table
on the page, so it is readable without sight of the colours."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    value: int
    series: int  # index of the series (0: transfers, 1: discrepancies ...)
    label: str


@dataclass(frozen=True, slots=True)
class Tick:
    y: float
    value: int


@dataclass(frozen=True, slots=True)
class XLabel:
    x: float
    text: str


@dataclass(frozen=True, slots=True)
class BarChart:
    width: int
    height: int
    plot_left: float
    plot_bottom: float
    plot_right: float
    plot_top: float
    bars: list[Bar]
    ticks: list[Tick]
    labels: list[XLabel]
    series: list[str]


def nice_scale(value: int, max_ticks: int = 5) -> tuple[int, int]:
    """(top, step) of a y axis with whole-number ticks: the smallest 1-2-5 step that covers `value` in at
    most `max_ticks` steps, and the top the ticks reach."""
    if value <= 1:
        return 1, 1
    exp = 1
    while True:
        for m in (1, 2, 5):
            step = m * exp
            if math.ceil(value / step) <= max_ticks:
                return math.ceil(value / step) * step, step
        exp *= 10


def grouped_bars(categories: Sequence[str], series: Sequence[str], values: Sequence[Sequence[int]], *,
                 width: int = 720, height: int = 240, label_every: int = 1) -> BarChart:
    """Grouped bars: `values[s][c]` is series s at category c."""
    left, right, top, bottom = 44.0, width - 8.0, 12.0, height - 40.0
    top_value, step = nice_scale(max((v for vs in values for v in vs), default=0))
    n = max(len(categories), 1)
    group_w = (right - left) / n
    bar_w = max(2.0, (group_w * 0.8) / max(len(series), 1))
    bars: list[Bar] = []
    for c, cat in enumerate(categories):
        for s in range(len(series)):
            v = values[s][c]
            h = (bottom - top) * v / top_value
            x = left + c * group_w + group_w * 0.1 + s * bar_w
            bars.append(Bar(round(x, 1), round(bottom - h, 1), round(bar_w - 1, 1), round(h, 1), v, s, cat))
    ticks = [Tick(round(bottom - (bottom - top) * v / top_value, 1), v) for v in range(0, top_value + 1, step)]
    last = len(categories) - 1
    labels = [XLabel(round(left + c * group_w + group_w / 2, 1), cat) for c, cat in enumerate(categories)
              if (last - c) % label_every == 0]  # counted from today, so today always has its label
    return BarChart(width, height, left, bottom, right, top, bars, ticks, labels, list(series))
