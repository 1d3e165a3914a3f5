"""Server-rendered SVG time charts: lines with gaps, shaded bands, point marks, a "now" rule,
axes with ticks and labels, and a legend.

No JavaScript and no dependency: `time_chart` returns one `<svg>` element as text that the
browser draws while it parses the page. Every text that reaches the SVG is escaped here, and
colours are the caller's constants. Times are Unix seconds and labelled in UTC.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape

__all__ = ["Band", "Chart", "Line", "Marks", "nice_ticks", "time_chart", "time_ticks"]

DAY = 86_400
# Tick steps a time axis may use, in seconds: minutes to months.
TIME_STEPS = (
    60, 300, 900, 1800, 3600, 2 * 3600, 3 * 3600, 6 * 3600, 12 * 3600,
    DAY, 2 * DAY, 7 * DAY, 14 * DAY, 28 * DAY, 91 * DAY, 364 * DAY,
)  # fmt: skip
MONDAY = 4 * DAY  # 1970-01-05, a Monday: week ticks fall on Mondays


@dataclass(frozen=True)
class Line:
    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]  # None leaves a gap
    css: str  # the path's class: what a page (or a test) finds it by
    color: str = "#222"
    width: float = 1.5
    dashed: bool = False


@dataclass(frozen=True)
class Band:
    label: str
    xs: Sequence[float]
    lo: Sequence[float | None]
    hi: Sequence[float | None]
    css: str
    color: str = "#1f77b4"
    opacity: float = 0.22


@dataclass(frozen=True)
class Marks:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    css: str
    titles: Sequence[str] = ()  # a tooltip per mark (the browser's own, no script)
    color: str = "#d62728"
    lo: Sequence[float] = ()  # with hi: a bar per mark (e.g. the band it fell outside)
    hi: Sequence[float] = ()
    bar_color: str = "#1f77b4"


@dataclass(frozen=True)
class Chart:
    lines: Sequence[Line] = ()
    bands: Sequence[Band] = ()
    marks: Sequence[Marks] = ()
    now: float | None = None  # a vertical rule, e.g. the forecast origin
    now_label: str = "now"
    title: str = ""  # the SVG's accessible name
    y_label: str = "value"
    width: int = 960
    height: int = 360
    margin: tuple[int, int, int, int] = field(default=(34, 30, 52, 58))  # top right bottom left


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values (1, 2, 2.5 or 5 times a power of ten apart) covering [lo, hi]:
    the first at or below lo, the last at or above hi."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"ticks need finite bounds, got {lo}..{hi}")
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def time_ticks(lo: float, hi: float, most: int = 9) -> tuple[float, list[float]]:
    """The smallest step of TIME_STEPS giving at most `most` ticks inside [lo, hi], and the
    ticks: multiples of the step in UTC (midnights for days, Mondays for weeks)."""
    span = max(hi - lo, 1.0)
    step = next((s for s in TIME_STEPS if span / s <= most), TIME_STEPS[-1])
    offset = MONDAY if step % (7 * DAY) == 0 else 0
    first = math.ceil((lo - offset) / step) * step + offset
    return step, [t for t in _frange(first, hi, step)]


def _frange(start: float, stop: float, step: float) -> list[float]:
    out, t = [], start
    while t <= stop + 1e-6:
        out.append(t)
        t += step
    return out


def _time_label(t: float, step: float) -> str:
    when = datetime.fromtimestamp(t, UTC)
    if step >= DAY or (when.hour == 0 and when.minute == 0):
        return when.strftime("%b %d")
    return when.strftime("%H:%M")


def _number(v: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{v:,.{min(decimals, 6)}f}"


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _runs(n: int, ok: Sequence[bool]) -> list[range]:
    """Maximal index ranges where ok holds: the pieces a gap splits a line into."""
    out, start = [], None
    for i in range(n):
        if ok[i] and start is None:
            start = i
        elif not ok[i] and start is not None:
            out.append(range(start, i))
            start = None
    if start is not None:
        out.append(range(start, n))
    return out


class _Scale:
    def __init__(self, chart: Chart, x0: float, x1: float, y0: float, y1: float) -> None:
        top, right, bottom, left = chart.margin
        self.left, self.top = left, top
        self.w = chart.width - left - right
        self.h = chart.height - top - bottom
        self.x0, self.x1 = x0, x1 if x1 > x0 else x0 + 1
        self.y0, self.y1 = y0, y1 if y1 > y0 else y0 + 1

    def x(self, t: float) -> float:
        return round(self.left + (t - self.x0) / (self.x1 - self.x0) * self.w, 1)

    def y(self, v: float) -> float:
        return round(self.top + (1 - (v - self.y0) / (self.y1 - self.y0)) * self.h, 1)


def _ok(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _line_path(sc: _Scale, line: Line) -> tuple[str, int]:
    ok = [_ok(y) for y in line.ys]
    parts = []
    for run in _runs(len(line.xs), ok):
        pts = " L".join(f"{sc.x(line.xs[i])},{sc.y(line.ys[i])}" for i in run)  # type: ignore[arg-type]
        parts.append(f"M{pts}")
    return " ".join(parts), sum(ok)


def _band_path(sc: _Scale, band: Band) -> tuple[str, int]:
    ok = [_ok(lo) and _ok(hi) for lo, hi in zip(band.lo, band.hi, strict=True)]
    parts = []
    for run in _runs(len(band.xs), ok):
        upper = [f"{sc.x(band.xs[i])},{sc.y(band.hi[i])}" for i in run]  # type: ignore[arg-type]
        lower = [f"{sc.x(band.xs[i])},{sc.y(band.lo[i])}" for i in reversed(run)]  # type: ignore[arg-type]
        parts.append("M" + " L".join(upper + lower) + " Z")
    return " ".join(parts), sum(ok)


def _bounds(chart: Chart) -> tuple[float, float, float, float] | None:
    xs = [x for s in (*chart.lines, *chart.bands, *chart.marks) for x in s.xs]
    ys = [
        *(y for line in chart.lines for y in _finite(line.ys)),
        *(y for b in chart.bands for y in (*_finite(b.lo), *_finite(b.hi))),
        *(y for m in chart.marks for y in (*_finite(m.ys), *_finite(m.lo), *_finite(m.hi))),
    ]
    if not xs or not ys:
        return None
    if chart.now is not None:
        xs.append(chart.now)
    return min(xs), max(xs), min(ys), max(ys)


def time_chart(chart: Chart) -> str:
    """The chart as one `<svg>` element; "" when there is nothing to draw."""
    bounds = _bounds(chart)
    if bounds is None:
        return ""
    x0, x1, ylo, yhi = bounds
    yt = nice_ticks(ylo, yhi)
    sc = _Scale(chart, x0, x1, yt[0], yt[-1])
    step, xt = time_ticks(x0, x1, most=max(3, sc.w // 100))
    ystep = yt[1] - yt[0] if len(yt) > 1 else 1.0
    bottom = sc.top + sc.h
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{chart.width}" '
        f'height="{chart.height}" viewBox="0 0 {chart.width} {chart.height}" role="img" '
        f'font-family="system-ui, sans-serif" font-size="12">',
        f"<title>{escape(chart.title)}</title>",
        '<g class="grid" stroke="#e4e4e4" stroke-width="1">',
    ]
    out += [
        f'<line x1="{sc.left}" x2="{sc.left + sc.w}" y1="{sc.y(v)}" y2="{sc.y(v)}"/>' for v in yt
    ]
    out += [f'<line x1="{sc.x(t)}" x2="{sc.x(t)}" y1="{sc.top}" y2="{bottom}"/>' for t in xt]
    out.append("</g>")
    for band in chart.bands:
        d, n = _band_path(sc, band)
        out.append(
            f'<path class="band {escape(band.css)}" data-points="{n}" d="{d}" '
            f'fill="{escape(band.color)}" fill-opacity="{band.opacity}" stroke="none"/>'
        )
    for line in chart.lines:
        d, n = _line_path(sc, line)
        dash = ' stroke-dasharray="5 4"' if line.dashed else ""
        out.append(
            f'<path class="line {escape(line.css)}" data-points="{n}" d="{d}" fill="none" '
            f'stroke="{escape(line.color)}" stroke-width="{line.width}"{dash} '
            'stroke-linejoin="round"/>'
        )
    if chart.now is not None:
        x = sc.x(chart.now)
        out.append(
            f'<g class="now"><line x1="{x}" x2="{x}" y1="{sc.top}" y2="{bottom}" '
            'stroke="#2ca02c" stroke-width="1.2" stroke-dasharray="2 3"/>'
            f'<text x="{x + 4}" y="{sc.top + 12}" fill="#2ca02c">{escape(chart.now_label)}</text></g>'
        )
    for m in chart.marks:
        whiskers = [
            f'<line x1="{sc.x(x)}" x2="{sc.x(x)}" y1="{sc.y(lo)}" y2="{sc.y(hi)}"/>'
            for x, lo, hi in zip(m.xs, m.lo, m.hi, strict=False)
            if _ok(lo) and _ok(hi)
        ]
        if whiskers:
            out.append(
                f'<g class="whiskers" stroke="{escape(m.bar_color)}" stroke-width="3" '
                f'stroke-opacity="0.3">{"".join(whiskers)}</g>'
            )
        titles = list(m.titles) + [""] * (len(m.xs) - len(m.titles))
        pts = [
            f'<circle cx="{sc.x(x)}" cy="{sc.y(y)}" r="3.5"><title>{escape(t)}</title></circle>'
            for x, y, t in zip(m.xs, m.ys, titles, strict=False)
            if _ok(y)
        ]
        out.append(
            f'<g class="marks {escape(m.css)}" data-points="{len(pts)}" fill="{escape(m.color)}" '
            f'stroke="white" stroke-width="0.8">{"".join(pts)}</g>'
        )
    out += _axes(chart, sc, yt, ystep, xt, step)
    out += _legend(chart, sc)
    out.append("</svg>")
    return "".join(out)


def _axes(
    chart: Chart, sc: _Scale, yt: list[float], ystep: float, xt: list[float], step: float
) -> list[str]:
    bottom = sc.top + sc.h
    out = [
        f'<g class="axes" stroke="#555" stroke-width="1"><line x1="{sc.left}" x2="{sc.left}" '
        f'y1="{sc.top}" y2="{bottom}"/><line x1="{sc.left}" x2="{sc.left + sc.w}" '
        f'y1="{bottom}" y2="{bottom}"/></g>',
        '<g class="y-ticks" fill="#333" text-anchor="end">',
    ]
    out += [f'<text x="{sc.left - 6}" y="{sc.y(v) + 4}">{_number(v, ystep)}</text>' for v in yt]
    out.append('</g><g class="x-ticks" fill="#333" text-anchor="middle">')
    out += [f'<text x="{sc.x(t)}" y="{bottom + 16}">{_time_label(t, step)}</text>' for t in xt]
    lo, hi = (datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M") for t in (sc.x0, sc.x1))
    out.append(
        f'</g><text class="x-label" x="{sc.left + sc.w / 2}" y="{chart.height - 10}" '
        f'text-anchor="middle" fill="#555">time (UTC), {lo} .. {hi}</text>'
        f'<text class="y-label" transform="translate(14 {sc.top + sc.h / 2}) rotate(-90)" '
        f'text-anchor="middle" fill="#555">{escape(chart.y_label)}</text>'
    )
    return out


def _legend(chart: Chart, sc: _Scale) -> list[str]:
    """One row above the plot: a swatch and a label per drawn element, left to right."""
    y = 16
    entries: list[tuple[Callable[[float], str], str]] = []
    for line in chart.lines:
        dash = ' stroke-dasharray="5 4"' if line.dashed else ""
        stroke = f'stroke="{escape(line.color)}" stroke-width="{max(line.width, 2)}"{dash}'
        entries.append(
            (
                lambda x, s=stroke: f'<line x1="{x}" x2="{x + 18}" y1="{y - 4}" y2="{y - 4}" {s}/>',
                line.label,
            )
        )
    for band in chart.bands:
        fill = f'fill="{escape(band.color)}" fill-opacity="{band.opacity + 0.1}"'
        entries.append(
            (
                lambda x, f=fill: f'<rect x="{x}" y="{y - 10}" width="18" height="11" {f}/>',
                band.label,
            )
        )
    for m in chart.marks:
        fill = f'fill="{escape(m.color)}"'
        entries.append(
            (lambda x, f=fill: f'<circle cx="{x + 9}" cy="{y - 4}" r="4" {f}/>', m.label)
        )
    out, x = ['<g class="legend" fill="#333">'], float(sc.left)
    for swatch, label in entries:
        out.append(swatch(x))
        out.append(f'<text x="{x + 24}" y="{y}">{escape(label)}</text>')
        x += 24 + 7 * len(label) + 18
    out.append("</g>")
    return out
