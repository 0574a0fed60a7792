"""Bar charts as plain geometry, drawn as SVG by templates/metering/_bar_chart.html.

No JavaScript and nothing from a CDN: the server computes each bar's place and size. A chart
is ``width`` x ``height`` user units: a left gutter for the scale, a bottom gutter for the day
numbers, one bar a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from metering.pricing import rounded

WIDTH, HEIGHT = 720, 180
LEFT, BOTTOM, TOP = 56, 20, 8


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str  # under the bar (the day of the month)
    title: str  # the bar's tooltip: its exact value


@dataclass(frozen=True)
class Chart:
    title: str
    unit: str
    bars: list[Bar]
    top_label: str  # the scale's top value
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    base: int = HEIGHT - BOTTOM
    top: int = TOP


def bar_chart(title: str, unit: str, points: list[tuple[str, Decimal]], places: int = 0) -> Chart:
    """Return a chart of ``points`` ((label, value), values >= 0), scaled to the largest, its
    values written with ``places`` decimals (rounded half-up)."""

    def fmt(value: Decimal) -> str:
        return f"{rounded(value, places):,.{places}f}"

    peak = max((value for _, value in points), default=Decimal(0))
    room = HEIGHT - BOTTOM - TOP
    slot = (WIDTH - LEFT) / max(1, len(points))
    bars = []
    for n, (label, value) in enumerate(points):
        height = float(value / peak) * room if peak > 0 else 0.0
        bars.append(
            Bar(
                x=round(LEFT + n * slot + slot * 0.15, 2),
                y=round(HEIGHT - BOTTOM - height, 2),
                width=round(slot * 0.7, 2),
                height=round(height, 2),
                label=label,
                title=f"{label}: {fmt(value)} {unit}",
            )
        )
    return Chart(title=title, unit=unit, bars=bars, top_label=fmt(peak))
