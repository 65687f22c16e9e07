"""Server-side SVG charts for the console: time series with an optional reference band and
alert markers, and colours for the drift heatmap.

Pure: data in, SVG text out (no clock, no files). Every chart is an ``<svg role="img">``
with a ``<title>`` and a ``<desc>`` for screen readers, scales to its container through
its ``viewBox``, and draws each data point as a ``<circle class="pt">`` carrying its
values in a ``<title>`` (the browser shows it on hover). Text is escaped here; the caller
marks the result safe for the template.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape

WIDTH = 640
HEIGHT = 200
_PAD_LEFT, _PAD_RIGHT, _PAD_TOP, _PAD_BOTTOM = 52, 22, 24, 30
MAX_POINTS = 1000
MARKER_GAP = 60.0  # pixels (in viewBox units) under which markers share a label


@dataclass(frozen=True, slots=True)
class Series:
    """One line: ``points`` are (x, y) with y None for a gap; ``tone`` names its colour
    class (``tone-1`` .. ``tone-5``, ``tone-bad``, ``tone-warn``, ``tone-good``)."""

    name: str
    points: Sequence[tuple[float, float | None]]
    tone: str = "tone-1"


@dataclass(frozen=True, slots=True)
class Marker:
    """A vertical line at ``x`` (an alert on the time axis); ``strong`` for an alert on
    the chart's own feature."""

    x: float
    label: str
    strong: bool = False


@dataclass(frozen=True, slots=True)
class Chart:
    """What to draw. ``band`` is a shaded (low, high) range (the reference band);
    ``y_range`` fixes the y axis (else it fits the data, the band and ``floor_zero``)."""

    title: str
    series: Sequence[Series]
    unit: str = ""
    band: tuple[float, float] | None = None
    band_label: str = "reference band"
    markers: Sequence[Marker] = field(default_factory=tuple)
    y_range: tuple[float, float] | None = None
    floor_zero: bool = False
    y_format: Callable[[float], str] | None = None


def render_time_chart(
    chart: Chart, *, chart_id: str, width: int = WIDTH, height: int = HEIGHT
) -> str:
    """The chart as one ``<svg>`` element; x values are unix seconds (labelled UTC).

    Raises:
        ValueError: a series with more than MAX_POINTS points, or a non-finite x.
    """
    for s in chart.series:
        if len(s.points) > MAX_POINTS:
            raise ValueError(f"series {s.name!r} has {len(s.points)} points (max {MAX_POINTS})")
        if any(not math.isfinite(x) for x, _ in s.points):
            raise ValueError(f"series {s.name!r} has a non-finite x value")
    fmt = chart.y_format or _format_number
    xs = [x for s in chart.series for x, _ in s.points]
    ys = [y for s in chart.series for _, y in s.points if y is not None and math.isfinite(y)]
    title_id, desc_id = f"{chart_id}-title", f"{chart_id}-desc"
    parts = [
        f'<svg class="chart" id="{escape(chart_id)}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-labelledby="{title_id} {desc_id}" preserveAspectRatio="xMidYMid meet">',
        f'<title id="{title_id}">{escape(chart.title)}</title>',
        f'<desc id="{desc_id}">{escape(_describe(chart, ys, fmt))}</desc>',
    ]
    if not xs or not ys:
        parts.append(
            f'<text class="empty" x="{width / 2}" y="{height / 2}" text-anchor="middle">'
            "no data yet</text></svg>"
        )
        return "".join(parts)
    x_lo, x_hi = min(xs), max(xs)
    x_lo, x_hi = (x_lo - 30, x_hi + 30) if x_hi == x_lo else (x_lo, x_hi)
    y_lo, y_hi = _y_range(chart, ys)
    plot = _Plot(x_lo, x_hi, y_lo, y_hi, width, height)
    parts += _axes(plot, fmt)
    if chart.band is not None:
        lo, hi = chart.band
        top, bottom = plot.y(min(max(hi, y_lo), y_hi)), plot.y(max(min(lo, y_hi), y_lo))
        parts.append(
            f'<rect class="band" x="{plot.left:.1f}" y="{top:.1f}" '
            f'width="{plot.right - plot.left:.1f}" height="{max(bottom - top, 0.0):.1f}">'
            f"<title>{escape(chart.band_label)}: {escape(fmt(lo))} to {escape(fmt(hi))}"
            f"{escape(_unit(chart.unit))}</title></rect>"
        )
    parts += _markers(plot, chart.markers)
    for s in chart.series:
        parts.append(_series(plot, s, fmt, chart.unit))
    parts.append(_legend(chart, width))
    parts.append("</svg>")
    return "".join(parts)


def heat_class(shift: float | None) -> str:
    """CSS class of a heatmap cell for a standardized shift (window sigmas)."""
    if shift is None or not math.isfinite(shift):
        return "heat-none"
    size = abs(shift)
    level = 0 if size < 1 else 1 if size < 2 else 2 if size < 3 else 3 if size < 5 else 4
    side = "up" if shift > 0 else "down"
    return "heat-0" if level == 0 else f"heat-{side}-{level}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering lo..hi (1, 2, 2.5 or 5 times a power of
    ten apart).

    Raises:
        ValueError: a non-finite bound, hi < lo, or count < 2.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo or count < 2:
        raise ValueError(f"cannot make ticks for {lo}..{hi} with count {count}")
    if hi == lo:
        return [lo]
    raw = (hi - lo) / (count - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else round(value, 12))
        value += step
    return ticks


@dataclass(frozen=True, slots=True)
class _Plot:
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    width: int
    height: int

    @property
    def left(self) -> float:
        return float(_PAD_LEFT)

    @property
    def right(self) -> float:
        return float(self.width - _PAD_RIGHT)

    @property
    def top(self) -> float:
        return float(_PAD_TOP)

    @property
    def bottom(self) -> float:
        return float(self.height - _PAD_BOTTOM)

    def x(self, value: float) -> float:
        return self.left + (value - self.x_lo) / (self.x_hi - self.x_lo) * (self.right - self.left)

    def y(self, value: float) -> float:
        share = (value - self.y_lo) / (self.y_hi - self.y_lo)
        return self.bottom - share * (self.bottom - self.top)


def _y_range(chart: Chart, ys: Sequence[float]) -> tuple[float, float]:
    if chart.y_range is not None:
        return chart.y_range
    lo, hi = min(ys), max(ys)
    if chart.band is not None:
        lo, hi = min(lo, chart.band[0]), max(hi, chart.band[1])
    if chart.floor_zero:
        lo = min(lo, 0.0)
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.08
    return (lo if chart.floor_zero and lo == 0.0 else lo - pad), hi + pad


def _markers(plot: _Plot, markers: Sequence[Marker]) -> list[str]:
    """Each marker as a dashed line; markers closer than MARKER_GAP pixels share one
    label (the strong marker's, else "N alerts"), so a burst of alerts stays legible."""
    shown = sorted(
        (m for m in markers if plot.x_lo <= m.x <= plot.x_hi), key=lambda m: (m.x, m.strong)
    )
    clusters: list[list[Marker]] = []
    for marker in shown:
        if clusters and plot.x(marker.x) - plot.x(clusters[-1][-1].x) < MARKER_GAP:
            clusters[-1].append(marker)
        else:
            clusters.append([marker])
    out = []
    for cluster in clusters:
        for marker in cluster:
            x = plot.x(marker.x)
            css = "marker strong" if marker.strong else "marker"
            out.append(
                f'<g class="{css}"><line x1="{x:.1f}" x2="{x:.1f}" y1="{plot.top:.1f}" '
                f'y2="{plot.bottom:.1f}"/><title>{escape(marker.label)} at '
                f"{escape(_clock(marker.x))}</title></g>"
            )
        strong = [m for m in cluster if m.strong]
        head = strong[0] if strong else cluster[0]
        label = head.label if len(cluster) == 1 or strong else f"{len(cluster)} alerts"
        if strong and len(cluster) > 1:
            label += f" (+{len(cluster) - 1})"
        x = plot.x(head.x)
        # A label near the right edge is drawn to the left of its line.
        anchor, dx = ("end", -3) if x > plot.right - 120 else ("start", 3)
        css = "marker-label strong" if strong else "marker-label"
        out.append(
            f'<text class="{css}" x="{x + dx:.1f}" y="{plot.top + 10:.1f}" '
            f'text-anchor="{anchor}">{escape(label)}</text>'
        )
    return out


def _axes(plot: _Plot, fmt: Callable[[float], str]) -> list[str]:
    out = ['<g class="axis" aria-hidden="true">']
    for tick in nice_ticks(plot.y_lo, plot.y_hi, 5):
        y = plot.y(tick)
        out.append(
            f'<line class="grid" x1="{plot.left:.1f}" x2="{plot.right:.1f}" '
            f'y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{plot.left - 6:.1f}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(fmt(tick))}</text>"
        )
    for tick in _time_ticks(plot.x_lo, plot.x_hi):
        x = plot.x(tick)
        out.append(
            f'<line class="tick" x1="{x:.1f}" x2="{x:.1f}" y1="{plot.bottom:.1f}" '
            f'y2="{plot.bottom + 4:.1f}"/><text x="{x:.1f}" y="{plot.bottom + 16:.1f}" '
            f'text-anchor="middle">{_clock(tick, seconds=False)}</text>'
        )
    out.append(
        f'<line class="frame" x1="{plot.left:.1f}" x2="{plot.right:.1f}" '
        f'y1="{plot.bottom:.1f}" y2="{plot.bottom:.1f}"/>'
    )
    out.append("</g>")
    return out


def _time_ticks(lo: float, hi: float) -> list[float]:
    span = hi - lo
    step = next(
        (s for s in (60, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400) if span / s <= 6),
        86400 * math.ceil(span / 86400 / 6),
    )
    first = math.ceil(lo / step) * step
    return [float(t) for t in range(int(first), int(hi) + 1, int(step))]


def _series(plot: _Plot, s: Series, fmt: Callable[[float], str], unit: str) -> str:
    runs: list[list[str]] = [[]]
    dots = []
    for x, y in s.points:
        if y is None or not math.isfinite(y):
            if runs[-1]:
                runs.append([])
            continue
        px, py = plot.x(x), plot.y(min(max(y, plot.y_lo), plot.y_hi))
        runs[-1].append(f"{px:.1f},{py:.1f}")
        dots.append(
            f'<circle class="pt" cx="{px:.1f}" cy="{py:.1f}" r="2.2">'
            f"<title>{escape(s.name)} {escape(fmt(y))}{escape(_unit(unit))} at "
            f"{_clock(x)}</title></circle>"
        )
    lines = "".join(
        f'<polyline class="line" points="{" ".join(run)}"/>' for run in runs if len(run) > 1
    )
    head = f'<g class="series {escape(s.tone)}" data-series="{escape(s.name)}">'
    return f"{head}{lines}{''.join(dots)}</g>"


def _legend(chart: Chart, width: int) -> str:
    items = [(s.name, s.tone) for s in chart.series]
    if chart.band is not None:
        items.append((chart.band_label, "band-key"))
    x = float(_PAD_LEFT)
    out = ['<g class="legend" aria-hidden="true">']
    for name, tone in items:
        out.append(
            f'<rect class="{escape(tone)}" x="{x:.1f}" y="6" width="10" height="10"/>'
            f'<text x="{x + 14:.1f}" y="15">{escape(name)}</text>'
        )
        x += 24 + 7.5 * len(name)
        if x > width - 80:
            break
    out.append("</g>")
    return "".join(out)


def _describe(chart: Chart, ys: Sequence[float], fmt: Callable[[float], str]) -> str:
    if not ys:
        return f"{chart.title}: no data."
    names = ", ".join(s.name for s in chart.series)
    text = (
        f"{names}: {sum(len(s.points) for s in chart.series)} points from "
        f"{fmt(min(ys))} to {fmt(max(ys))}{_unit(chart.unit)}."
    )
    if chart.band is not None:
        text += f" {chart.band_label} {fmt(chart.band[0])} to {fmt(chart.band[1])}."
    if chart.markers:
        text += f" {len(chart.markers)} alert(s) marked."
    return text


def _format_number(value: float) -> str:
    size = abs(value)
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _unit(unit: str) -> str:
    return f" {unit}" if unit and unit != "%" else unit


def _clock(t: float, *, seconds: bool = True) -> str:
    moment = datetime.fromtimestamp(t, timezone.utc)
    return moment.strftime("%H:%M:%S" if seconds else "%H:%M")
