"""Line charts as SVG geometry: computed here, drawn by `templates/_chart.html`.

The cycles page plots the per-cycle figures as inline SVG built on the server, not as a
PNG or with a JavaScript charting library: the chart is part of the page (no second
request, nothing cached apart from the page), it scales and stays sharp, and every text
in it (titles, axis labels, tick labels, the series' names, which may hold labeler group
names) goes through the template's autoescaping like the rest of the page, under the CSP
`default-src 'self'` (colours come from style.css classes, not inline styles). Pure
functions: figures in, pixel coordinates and labels out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

WIDTH, HEIGHT = 360, 250  # three side by side on a 1280 px wide page
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 30, 46  # margins (px) for the title, tick labels and axis labels
COLOURS = 6  # series classes s0..s5 in style.css; more series reuse them


@dataclass(frozen=True)
class Tick:
    at: float  # pixel coordinate along its axis
    label: str


@dataclass(frozen=True)
class Marker:
    x: float
    y: float
    title: str  # the figure in words, shown on hover and read by screen readers


@dataclass(frozen=True)
class Line:
    label: str
    css: str  # "s0".."s5": the series' colour
    points: str  # of the <polyline> through the figures present ("" for fewer than two); a cycle
    # without the figure (skipped, failed) is left out, as the demo's plot leaves it out
    markers: list[Marker]


@dataclass(frozen=True)
class Guide:
    """A horizontal reference line (chance, a ceiling) with its label."""

    y: float
    label: str


@dataclass(frozen=True)
class Chart:
    title: str
    x_label: str
    y_label: str
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    lines: list[Line]
    guides: list[Guide]
    width: int = WIDTH
    height: int = HEIGHT
    left: float = LEFT
    right: float = WIDTH - RIGHT
    top: float = TOP
    bottom: float = HEIGHT - BOTTOM

    @property
    def empty(self) -> bool:
        return not any(line.markers for line in self.lines)


def nice_step(span: float, count: int = 5) -> float:
    """The tick step from 1, 2 or 5 x 10^k that cuts `span` into about `count` parts."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * 0.999)


def tick_label(value: float, step: float) -> str:
    """Just enough decimals for the step: 0.2 -> "0.4", 0.05 -> "0.35", 10 -> "30"."""
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text  # never "-0.0"


def axis_range(values: Sequence[float], floor: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """(low, high, step) of an axis showing `values` (and all of `floor`, when given),
    widened to whole steps so the end ticks sit on the axis ends."""
    low, high = min(values, default=0.0), max(values, default=1.0)
    if floor is not None:
        low, high = min(low, floor[0]), max(high, floor[1])
    if high - low < 1e-12:
        pad = abs(high) * 0.1 or 0.5
        low, high = low - pad, high + pad
    step = nice_step(high - low)
    return math.floor(low / step + 1e-9) * step, math.ceil(high / step - 1e-9) * step, step


def line_chart(title: str, x_label: str, y_label: str, xs: Sequence[int],
               series: Mapping[str, Sequence[float | None]], *, y_floor: tuple[float, float] | None = None,
               guides: Mapping[str, float] | None = None, x_name: str = "cycle") -> Chart:  # fmt: skip
    """One chart: each series holds a figure (or None: missing) per x in `xs` (whole
    numbers, such as cycle ids, ascending); a line joins the figures present.
    `y_floor`: a y range always shown (0..1 for a rate); `guides`: reference lines by label."""
    guides = dict(guides or {})
    figures = {label: [(x, v) for x, v in zip(xs, values) if v is not None and math.isfinite(v)]
               for label, values in series.items()}  # fmt: skip
    present = [v for points in figures.values() for _, v in points]
    y_low, y_high, y_step = axis_range(present + list(guides.values()), y_floor)
    x_low, x_high = (min(xs), max(xs)) if xs else (0, 1)
    if x_low == x_high:
        x_low, x_high = x_low - 1, x_high + 1
    x_step = max(1, math.ceil(nice_step(x_high - x_low, 8)))
    left, right, top, bottom = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM

    def px(x: float) -> float:
        return round(left + (x - x_low) / (x_high - x_low) * (right - left), 1)

    def py(y: float) -> float:
        return round(bottom - (y - y_low) / (y_high - y_low) * (bottom - top), 1)

    first_x = math.ceil(x_low / x_step) * x_step
    x_ticks = [Tick(px(x), str(x)) for x in range(first_x, x_high + 1, x_step)]
    y_values = [y_low + i * y_step for i in range(round((y_high - y_low) / y_step) + 1)]
    y_ticks = [Tick(py(y), tick_label(y, y_step)) for y in y_values]
    lines = []
    for i, (label, points) in enumerate(figures.items()):
        line = " ".join(f"{px(x)},{py(v)}" for x, v in points) if len(points) > 1 else ""
        markers = [Marker(px(x), py(v), f"{label}, {x_name} {x}: {v:.3g}") for x, v in points]
        lines.append(Line(label, f"s{i % COLOURS}", line, markers))
    return Chart(title, x_label, y_label, x_ticks, y_ticks, lines, [Guide(py(y), label) for label, y in guides.items()],
                 left=left, right=right, top=top, bottom=bottom)  # fmt: skip

