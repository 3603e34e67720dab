"""Charts as server-rendered SVG: line charts over time, bar charts (histograms, with a link
per bar) and stacked bars over time. Each returns a `Chart`: the SVG (all text escaped,
accessible title and description, colours by CSS class) and the same data as table rows.
"""

from __future__ import annotations

import datetime as dt
import html
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

EMPTY_TEXT = "No data in this window"
# Series colours when the page's stylesheet says nothing (CSS classes override them).
PALETTE = ("#3b6fd8", "#d8773b", "#8e44ad", "#2a9d5c", "#c0392b", "#7f8c8d", "#b8a21a",
           "#1abc9c")
STYLESHEET = "\n".join(
    [".chart { font: 11px system-ui, sans-serif; }",
     ".chart .axis, .chart .grid { stroke: #ccc; }",
     ".chart .tick, .chart .caption { fill: #666; }",
     ".chart .chart-empty { fill: #888; font-size: 13px; }"]
    + [f".chart .series-{i} {{ stroke: {c}; fill: {c}; }}" for i, c in enumerate(PALETTE)]
    + [".chart path.line { fill: none; stroke-width: 1.5; }"])

_ids = itertools.count(1)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_SAFE_HREF = re.compile(r"^(?:[/?#]|https?://)", re.IGNORECASE)


@dataclass(frozen=True)
class Line:
    """One series: its label and a value (or None: no data) per time bucket."""

    label: str
    values: Sequence[float | None]


@dataclass(frozen=True)
class Bar:
    """One bar of a bar chart; `href` makes it a link (relative or http(s) only)."""

    label: str
    value: float
    href: str | None = None


@dataclass(frozen=True)
class Chart:
    """The SVG markup (escaped; `__html__` lets Jinja2 embed it as is) and the same data as
    a table: `header` and `rows` of formatted text (to be escaped by the page)."""

    svg: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]] = field(default_factory=list)
    empty: bool = False

    def __html__(self) -> str:
        return self.svg

    def __str__(self) -> str:
        return self.svg


def esc(text: object) -> str:
    """Text for XML content or a quoted attribute: escaped, without the characters XML 1.0
    cannot carry."""
    return html.escape(_NOT_XML.sub("\ufffd", str(text)), quote=True)


def format_value(value: float | None, unit: str = "") -> str:
    """ms as "850 ms" / "1.2 s"; "%" for a share 0..1; "/min" for a rate; else a number."""
    if value is None:
        return "–"
    if unit == "ms":
        if abs(value) >= 1000:
            return f"{value / 1000:.3g} s" if abs(value) < 100_000 else f"{value / 1000:,.0f} s"
        return f"{value:.3g} ms" if abs(value) < 100 else f"{value:.0f} ms"
    if unit == "%":
        return f"{value * 100:.3g}%" if value else "0%"
    number = f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.3g}"
    return f"{number}{unit if unit.startswith('/') else (' ' + unit if unit else '')}"


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """0 up to at least `high` in steps of 1, 2, 2.5 or 5 × 10^k, about `count` of them."""
    if not high > 0 or not math.isfinite(high):
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [round(i * step, 12) for i in range(math.ceil(high / step - 1e-9) + 1)]


_TIME_STEPS = (60, 300, 600, 900, 1800, 3600, 7200, 3 * 3600, 6 * 3600, 12 * 3600, 86400,
               2 * 86400)


def time_ticks(first_us: int, last_us: int, tz: dt.tzinfo, count: int = 7) -> list[int]:
    """Round times (µs) in `tz` between first and last, at most about `count`."""
    span = max(last_us - first_us, 1) / 1e6
    step = next((s for s in _TIME_STEPS if span / s <= count), _TIME_STEPS[-1])
    offset = _utcoffset(first_us, tz)
    t = math.ceil((first_us / 1e6 + offset) / step) * step - offset
    out = []
    while t * 1e6 <= last_us:
        out.append(int(t * 1_000_000))
        t += step
    return out


def time_label(t_us: int, tz: dt.tzinfo, span_us: int) -> str:
    moment = dt.datetime.fromtimestamp(t_us / 1e6, tz)
    if span_us > 2 * 86_400_000_000:
        return moment.strftime("%a %H:%M")
    return moment.strftime("%H:%M:%S" if span_us <= 1_800_000_000 else "%H:%M")


def zone_name(tz: dt.tzinfo, t_us: int) -> str:
    """"CET, UTC+01:00" (or only the offset when the zone has no name)."""
    moment = dt.datetime.fromtimestamp(t_us / 1e6, tz)
    offset = moment.strftime("%z")
    utc = f"UTC{offset[:3]}:{offset[3:]}" if offset and offset != "+0000" else "UTC"
    name = moment.tzname()
    return f"{name}, {utc}" if name and name not in (utc, "UTC") else utc


def _utcoffset(t_us: int, tz: dt.tzinfo) -> float:
    delta = dt.datetime.fromtimestamp(t_us / 1e6, tz).utcoffset()
    return delta.total_seconds() if delta else 0.0


def _local() -> dt.tzinfo:
    return dt.datetime.now().astimezone().tzinfo or dt.timezone.utc


# --- drawing ----------------------------------------------------------------------------------

_LEFT, _RIGHT, _TOP, _BOTTOM = 58, 12, 26, 36


def _open(title: str, desc: str, width: int, height: int, kind: str) -> tuple[str, list[str]]:
    uid = f"chart{next(_ids)}"
    return uid, [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart chart-{kind}" role="img" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'aria-labelledby="{uid}-title {uid}-desc">',
        f'<title id="{uid}-title">{esc(title)}</title>',
        f'<desc id="{uid}-desc">{esc(desc)}</desc>',
    ]


def _empty(title: str, header: tuple[str, ...], width: int, height: int, kind: str,
           text: str) -> Chart:
    _, out = _open(title, text, width, height, kind)
    out.append(f'<rect class="axis" x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" '
               'fill="none" stroke="#ccc"/>')
    out.append(f'<text class="chart-empty" x="{width / 2:.1f}" y="{height / 2:.1f}" '
               f'text-anchor="middle" dominant-baseline="middle" fill="#888">{esc(text)}</text>')
    out.append("</svg>")
    return Chart("\n".join(out), header, [], empty=True)


def _legend(labels: Sequence[str], width: int) -> list[str]:
    out, x = ['<g class="legend">'], float(_LEFT)
    for i, label in enumerate(labels):
        colour = PALETTE[i % len(PALETTE)]
        out.append(f'<rect class="series-{i % len(PALETTE)}" x="{x:.1f}" y="6" width="10" '
                   f'height="10" fill="{colour}" stroke="{colour}"/>')
        out.append(f'<text x="{x + 14:.1f}" y="15">{esc(label)}</text>')
        x += 24 + 6.5 * min(len(label), 40)
        if x > width - 40:
            break
    out.append("</g>")
    return out


def _y_axis(ticks: list[float], unit: str, plot_h: float, width: int) -> list[str]:
    top = ticks[-1] or 1.0
    out = ['<g class="y-axis">']
    for tick in ticks:
        y = _TOP + plot_h - tick / top * plot_h
        out.append(f'<line class="grid" x1="{_LEFT}" x2="{width - _RIGHT}" y1="{y:.1f}" '
                   f'y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text class="tick" x="{_LEFT - 4}" y="{y + 3.5:.1f}" text-anchor="end" '
                   f'fill="#666">{esc(format_value(tick, unit))}</text>')
    out.append("</g>")
    return out


def _x_time_axis(first: int, end: int, x_of: object, tz: dt.tzinfo, height: int,
                 width: int) -> list[str]:
    out = ['<g class="x-axis">',
           f'<line class="axis" x1="{_LEFT}" x2="{width - _RIGHT}" y1="{height - _BOTTOM}" '
           f'y2="{height - _BOTTOM}" stroke="#ccc"/>']
    for t in time_ticks(first, end, tz):
        x = x_of(t)  # type: ignore[operator]
        out.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{height - _BOTTOM}" '
                   f'y2="{height - _BOTTOM + 4}" stroke="#ccc"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{height - _BOTTOM + 15}" '
                   f'text-anchor="middle" fill="#666">'
                   f'{esc(time_label(t, tz, end - first))}</text>')
    out.append(f'<text class="caption" x="{width - _RIGHT}" y="{height - 4}" text-anchor="end" '
               f'fill="#666">time ({esc(zone_name(tz, first))})</text>')
    out.append("</g>")
    return out


def _step(times: Sequence[int], step_us: int | None) -> int:
    if step_us:
        return step_us
    return times[1] - times[0] if len(times) > 1 else 60_000_000


def line_chart(
    times: Sequence[int], lines: Sequence[Line], *, title: str, unit: str = "ms",
    step_us: int | None = None, tz: dt.tzinfo | None = None, width: int = 720,
    height: int = 220, has_data: bool | None = None, empty_text: str = EMPTY_TEXT,
) -> Chart:
    """Lines over time: `times` are bucket starts (µs), each line has a value per bucket
    (None: a gap). Empty (the "no data" state) when no value is given, or `has_data` is
    False (a throughput of zeros in every bucket is no data)."""
    tz = tz or _local()
    header = ("Time", *(line.label for line in lines))
    values = [v for line in lines for v in line.values if v is not None]
    if not times or not values or has_data is False:
        return _empty(title, header, width, height, "line", empty_text)
    step = _step(times, step_us)
    first, end = times[0], times[-1] + step
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    ticks = nice_ticks(max(values))

    def x_of(t: float) -> float:
        return _LEFT + (t - first) / (end - first) * plot_w

    def y_of(v: float) -> float:
        return _TOP + plot_h - v / (ticks[-1] or 1.0) * plot_h

    span = end - first
    desc = (f"Line chart of {', '.join(line.label for line in lines)} per "
            f"{format_value(step / 60e6, 'min') if step >= 60e6 else f'{step / 1e6:g} s'} "
            f"from {time_label(first, tz, span)} to {time_label(end, tz, span)} "
            f"({zone_name(tz, first)}); the same values are in the table below.")
    _, out = _open(title, desc, width, height, "line")
    out += _legend([line.label for line in lines], width)
    out += _y_axis(ticks, unit, plot_h, width)
    out += _x_time_axis(first, end, x_of, tz, height, width)
    for i, line in enumerate(lines):
        css, colour = f"series-{i % len(PALETTE)}", PALETTE[i % len(PALETTE)]
        path, pen_down = [], False
        points = []
        for t, v in zip(times, line.values, strict=False):
            if v is None:
                pen_down = False
                continue
            x, y = x_of(t + step / 2), y_of(v)
            path.append(f"{'L' if pen_down else 'M'}{x:.1f},{y:.1f}")
            pen_down = True
            points.append(f'<circle class="point {css}" cx="{x:.1f}" cy="{y:.1f}" r="2.5" '
                          f'fill="{colour}"><title>{esc(time_label(t, tz, span))} '
                          f'{esc(line.label)}: {esc(format_value(v, unit))}</title></circle>')
        out.append(f'<g class="series {css}"><path class="line {css}" d="{" ".join(path)}" '
                   f'fill="none" stroke="{colour}"/>')
        out += points
        out.append("</g>")
    out.append("</svg>")
    rows = [(_table_time(t, tz), *(format_value(line.values[i] if i < len(line.values)
                                                else None, unit) for line in lines))
            for i, t in enumerate(times)]
    return Chart("\n".join(out), header, rows)


def stacked_chart(
    times: Sequence[int], stacks: Sequence[Line], *, title: str, unit: str = "ms",
    step_us: int | None = None, tz: dt.tzinfo | None = None, width: int = 720,
    height: int = 220, empty_text: str = EMPTY_TEXT,
) -> Chart:
    """Stacked bars over time (time spent by span type or dependency): one bar per bucket,
    one segment per series, in the order given (first at the bottom)."""
    tz = tz or _local()
    header = ("Time", *(s.label for s in stacks), "Total")
    totals = [sum((s.values[i] or 0.0) for s in stacks if i < len(s.values))
              for i in range(len(times))]
    if not times or not any(total > 0 for total in totals):
        return _empty(title, header, width, height, "stacked", empty_text)
    step = _step(times, step_us)
    first, end = times[0], times[-1] + step
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    ticks = nice_ticks(max(totals))
    top = ticks[-1] or 1.0

    def x_of(t: float) -> float:
        return _LEFT + (t - first) / (end - first) * plot_w

    bar_w = max(plot_w / len(times) - 1.0, 1.0)
    desc = (f"Stacked bars of {', '.join(s.label for s in stacks)} per bucket from "
            f"{time_label(first, tz, end - first)} to {time_label(end, tz, end - first)} "
            f"({zone_name(tz, first)}); the same values are in the table below.")
    _, out = _open(title, desc, width, height, "stacked")
    out += _legend([s.label for s in stacks], width)
    out += _y_axis(ticks, unit, plot_h, width)
    out += _x_time_axis(first, end, x_of, tz, height, width)
    for i, t in enumerate(times):
        base = 0.0
        for n, stack in enumerate(stacks):
            v = stack.values[i] if i < len(stack.values) else None
            if not v or v <= 0:
                continue
            css, colour = f"series-{n % len(PALETTE)}", PALETTE[n % len(PALETTE)]
            y0 = _TOP + plot_h - (base + v) / top * plot_h
            h = v / top * plot_h
            out.append(f'<rect class="segment {css}" x="{x_of(t) + 0.5:.1f}" y="{y0:.1f}" '
                       f'width="{bar_w:.1f}" height="{h:.1f}" fill="{colour}">'
                       f'<title>{esc(time_label(t, tz, end - first))} {esc(stack.label)}: '
                       f'{esc(format_value(v, unit))}</title></rect>')
            base += v
    out.append("</svg>")
    rows = [(_table_time(t, tz),
             *(format_value(s.values[i] if i < len(s.values) else None, unit) for s in stacks),
             format_value(totals[i], unit)) for i, t in enumerate(times)]
    return Chart("\n".join(out), header, rows)


def bar_chart(
    bars: Sequence[Bar], *, title: str, unit: str = "", x_label: str = "",
    value_label: str = "Count", width: int = 720, height: int = 200,
    empty_text: str = EMPTY_TEXT,
) -> Chart:
    """Bars left to right (a histogram: each bar a bucket, labelled by its range); a bar
    with `href` is a link, so picking a bucket works without JavaScript."""
    header = (x_label or "Bucket", value_label)
    if not bars or not any(bar.value > 0 for bar in bars):
        return _empty(title, header, width, height, "bar", empty_text)
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    ticks = nice_ticks(max(bar.value for bar in bars))
    top = ticks[-1] or 1.0
    slot = plot_w / len(bars)
    desc = (f"Bar chart of {value_label.lower()} by {(x_label or 'bucket').lower()}, "
            f"{len(bars)} bars; the same values are in the table below.")
    _, out = _open(title, desc, width, height, "bar")
    out += _y_axis(ticks, unit, plot_h, width)
    out.append(f'<line class="axis" x1="{_LEFT}" x2="{width - _RIGHT}" y1="{height - _BOTTOM}" '
               f'y2="{height - _BOTTOM}" stroke="#ccc"/>')
    every = max(1, math.ceil(len(bars) / 10))  # at most ~10 labels
    for i, bar in enumerate(bars):
        x = _LEFT + i * slot
        h = max(bar.value, 0) / top * plot_h
        hover = f"{bar.label}: {format_value(bar.value, unit)}"
        rect = (f'<rect class="bar series-0" x="{x + 0.5:.1f}" y="{_TOP + plot_h - h:.1f}" '
                f'width="{max(slot - 1, 1):.1f}" height="{h:.1f}" fill="{PALETTE[0]}">'
                f'<title>{esc(hover)}</title></rect>')
        if bar.href and _SAFE_HREF.match(bar.href):
            # A transparent full-height target, so short bars are easy to pick too.
            out.append(f'<a href="{esc(bar.href)}" aria-label="{esc(hover)}">'
                       f'<rect class="target" x="{x:.1f}" y="{_TOP}" width="{slot:.1f}" '
                       f'height="{plot_h}" fill="transparent"/>{rect}</a>')
        else:
            out.append(rect)
        if i % every == 0:
            out.append(f'<text class="tick" x="{x + slot / 2:.1f}" y="{height - _BOTTOM + 15}" '
                       f'text-anchor="middle" fill="#666">{esc(bar.label)}</text>')
    if x_label:
        out.append(f'<text class="caption" x="{width - _RIGHT}" y="{height - 4}" '
                   f'text-anchor="end" fill="#666">{esc(x_label)}</text>')
    out.append("</svg>")
    return Chart("\n".join(out), header,
                 [(bar.label, format_value(bar.value, unit)) for bar in bars])


def _table_time(t_us: int, tz: dt.tzinfo) -> str:
    return dt.datetime.fromtimestamp(t_us / 1e6, tz).strftime("%Y-%m-%d %H:%M:%S %z")


# --- the dashboard's charts, from beatlib.receiver.series results ------------------------------


def latency_chart(data: dict[str, Any], tz: dt.tzinfo | None = None,
                  title: str = "Latency") -> Chart:
    """p50/p95/p99 lines of a `series.transaction_series` result."""
    buckets = data["buckets"]
    return line_chart([b["start"] for b in buckets],
                      [Line(p, [b[p] for b in buckets]) for p in ("p50", "p95", "p99")],
                      title=title, unit="ms", step_us=data["step"] * 1_000_000, tz=tz)


def throughput_chart(data: dict[str, Any], tz: dt.tzinfo | None = None,
                     title: str = "Throughput") -> Chart:
    """Transactions per minute per bucket of a `series.transaction_series` result."""
    buckets = data["buckets"]
    return line_chart([b["start"] for b in buckets], [Line("per minute", [b["tpm"] for b in
                                                                          buckets])],
                      title=title, unit="/min", step_us=data["step"] * 1_000_000, tz=tz,
                      has_data=bool(data["count"]))


def error_rate_chart(data: dict[str, Any], tz: dt.tzinfo | None = None,
                     title: str = "Failed transaction rate") -> Chart:
    """The failure share per bucket of a `series.transaction_series` result."""
    buckets = data["buckets"]
    return line_chart([b["start"] for b in buckets],
                      [Line("failed", [b["error_rate"] for b in buckets])],
                      title=title, unit="%", step_us=data["step"] * 1_000_000, tz=tz)


def distribution_chart(data: dict[str, Any], href: Callable[[float, float], str] | None = None,
                       title: str = "Latency distribution") -> Chart:
    """A `series.distribution` result as a histogram; `href(low, high)` links each bucket
    (to the page listing `series.samples` of that range)."""
    bars = [Bar(f"{format_value(b['low'], 'ms')} – {format_value(b['high'], 'ms')}",
                b["count"], href(b["low"], b["high"]) if href and b["count"] else None)
            for b in data["buckets"]]
    return bar_chart(bars, title=title, x_label="Duration", value_label="Transactions")


def stacked_time_chart(data: dict[str, Any], tz: dt.tzinfo | None = None,
                       title: str = "Time spent by span type") -> Chart:
    """A `series.span_type_series` or `series.dependency_series` result as stacked bars."""
    buckets = data["buckets"]
    return stacked_chart([b["start"] for b in buckets],
                         [Line(k, [b["total"][k] for b in buckets]) for k in data["keys"]],
                         title=title, unit="ms", step_us=data["step"] * 1_000_000, tz=tz)


def occurrences_chart(data: dict[str, Any], title: str = "Occurrences") -> Chart:
    """A `series.error_series` result as bars per bucket (time labels in the local zone)."""
    tz = _local()
    span = data["buckets"][-1]["start"] - data["buckets"][0]["start"] if data["buckets"] else 0
    bars = [Bar(time_label(b["start"], tz, span), b["count"]) for b in data["buckets"]]
    return bar_chart(bars, title=title, x_label=f"time ({zone_name(tz, data['since'])})",
                     value_label="Occurrences")
