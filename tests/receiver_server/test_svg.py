"""The chart renderer: valid SVG (parsed with xml.etree), escaped names, accessible title and
description, links on bars, the "no data" state, the table rows, ticks and time labels."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET

import pytest

from beatlib.receiver import svg

NS = "{http://www.w3.org/2000/svg}"
T0 = 1_796_000_400_000_000  # a round hour, µs
MIN = 60_000_000
UTC = dt.timezone.utc
EVIL = '<script>alert("x")</script> & \x00\x1b'


def parse(chart: svg.Chart) -> ET.Element:
    root = ET.fromstring(chart.svg)
    assert root.tag == NS + "svg" and root.get("role") == "img"
    title, desc = root.find(NS + "title"), root.find(NS + "desc")
    assert title is not None and title.text and desc is not None and desc.text
    assert set(root.get("aria-labelledby", "").split()) == {title.get("id"), desc.get("id")}
    return root


def test_line_chart_draws_each_series_with_hover_values_and_table() -> None:
    times = [T0 + i * MIN for i in range(60)]
    lines = [svg.Line("p50", [10.0 + i for i in range(60)]),
             svg.Line("p95", [None if i in (5, 6) else 50.0 + i for i in range(60)]),
             svg.Line("p99", [1500.0] * 60)]
    chart = svg.line_chart(times, lines, title="Latency", unit="ms", tz=UTC)
    root = parse(chart)
    assert not chart.empty
    paths = root.findall(f".//{NS}path")
    assert [p.get("class") for p in paths] == ["line series-0", "line series-1", "line series-2"]
    assert paths[1].get("d", "").count("M") == 2  # a gap where p95 has no value
    points = root.findall(f".//{NS}circle")
    assert len(points) == 60 + 58 + 60
    hover = [c.findtext(NS + "title") for c in points]
    assert "01:59 p99: 1.5 s" in hover and "01:00 p50: 10 ms" in hover
    ticks = [t.text for t in root.iter(NS + "text") if t.get("class") == "tick"]
    assert [t for t in ticks if ":" in t] == ["01:00", "01:10", "01:20", "01:30", "01:40",
                                              "01:50", "02:00"]
    assert ticks[:3] == ["0 ms", "500 ms", "1 s"]
    assert "time (UTC)" in [t.text for t in root.iter(NS + "text")]
    assert chart.header == ("Time", "p50", "p95", "p99")
    assert len(chart.rows) == 60
    assert chart.rows[5] == ("2026-11-30 01:05:00 +0000", "15 ms", "–", "1.5 s")
    assert chart.__html__() == chart.svg


def test_time_labels_name_the_zone() -> None:
    tz = dt.timezone(dt.timedelta(hours=5, minutes=30), "IST")
    chart = svg.line_chart([T0 + i * MIN for i in range(3)], [svg.Line("n", [1, 2, 3])],
                           title="t", tz=tz, unit="/min")
    captions = [t.text for t in parse(chart).iter(NS + "text") if t.get("class") == "caption"]
    assert captions == ["time (IST, UTC+05:30)"]
    assert chart.rows[0][0].endswith("+0530")


def test_names_with_markup_are_escaped() -> None:
    times = [T0, T0 + MIN]
    charts = [
        svg.line_chart(times, [svg.Line(EVIL, [1.0, 2.0])], title=EVIL, tz=UTC),
        svg.stacked_chart(times, [svg.Line(EVIL, [1.0, 2.0])], title=EVIL, tz=UTC),
        svg.bar_chart([svg.Bar(EVIL, 3, href='/x?a=1&b="2"><script>')], title=EVIL,
                      x_label=EVIL),
    ]
    for chart in charts:
        root = parse(chart)  # would not parse if anything came through raw
        assert "<script" not in chart.svg
        assert root.findtext(NS + "title", "").startswith('<script>alert("x")</script> & ')
        assert not any(el.tag.endswith("script") for el in root.iter())
    [link] = parse(charts[2]).iter(NS + "a")
    assert link.get("href") == '/x?a=1&b="2"><script>'


def test_bar_links_only_for_safe_targets() -> None:
    bars = [svg.Bar("1 ms", 4, href="?min=1&max=1.25"), svg.Bar("2 ms", 0, href="/t?x=1"),
            svg.Bar("3 ms", 2, href="javascript:alert(1)"), svg.Bar("4 ms", 1)]
    chart = svg.bar_chart(bars, title="Latency distribution", x_label="Duration")
    root = parse(chart)
    assert [a.get("href") for a in root.iter(NS + "a")] == ["?min=1&max=1.25", "/t?x=1"]
    assert [r.findtext(NS + "title") for r in root.iter(NS + "rect")
            if "bar" in (r.get("class") or "")] == ["1 ms: 4", "2 ms: 0", "3 ms: 2", "4 ms: 1"]
    assert chart.header == ("Duration", "Count")
    assert chart.rows == [("1 ms", "4"), ("2 ms", "0"), ("3 ms", "2"), ("4 ms", "1")]


def test_stacked_bars_add_up() -> None:
    times = [T0 + i * 30 * MIN for i in range(4)]
    stacks = [svg.Line("db", [10.0, 0.0, 5.0, None]), svg.Line("external", [30.0, 0.0, 0.0, 2.0])]
    chart = svg.stacked_chart(times, stacks, title="Time by span type", tz=UTC)
    root = parse(chart)
    segments = [r for r in root.iter(NS + "rect") if "segment" in (r.get("class") or "")]
    assert [s.get("class") for s in segments] == [
        "segment series-0", "segment series-1", "segment series-0", "segment series-1"]
    first_db, first_ext = segments[0], segments[1]
    assert float(first_ext.get("height", 0)) == pytest.approx(3 * float(first_db.get("height", 0)),
                                                              abs=0.2)
    assert chart.header == ("Time", "db", "external", "Total")
    assert [row[1:] for row in chart.rows] == [("10 ms", "30 ms", "40 ms"),
                                               ("0 ms", "0 ms", "0 ms"),
                                               ("5 ms", "0 ms", "5 ms"), ("–", "2 ms", "2 ms")]


@pytest.mark.parametrize("chart", [
    lambda: svg.line_chart([T0, T0 + MIN], [svg.Line("p95", [None, None])], title="Latency"),
    lambda: svg.line_chart([], [], title="Latency"),
    lambda: svg.line_chart([T0], [svg.Line("tpm", [0.0])], title="Throughput", has_data=False),
    lambda: svg.stacked_chart([T0, T0 + MIN], [svg.Line("db", [0.0, None])], title="Spans"),
    lambda: svg.bar_chart([], title="Distribution"),
    lambda: svg.bar_chart([svg.Bar("1 ms", 0)], title="Distribution"),
])
def test_empty_state_says_so(chart: object) -> None:
    out = chart()  # type: ignore[operator]
    root = parse(out)
    assert out.empty and out.rows == []
    texts = [t.text for t in root.iter(NS + "text")]
    assert texts == [svg.EMPTY_TEXT]
    assert root.findtext(NS + "desc") == svg.EMPTY_TEXT


def test_zero_error_rate_is_data_not_empty() -> None:
    chart = svg.line_chart([T0, T0 + MIN], [svg.Line("error rate", [0.0, 0.0])],
                           title="Errors", unit="%", tz=UTC)
    assert not chart.empty and chart.rows[0][1] == "0%"


@pytest.mark.parametrize(("high", "ticks"), [
    (0, [0.0, 1.0]), (1, [0, 0.2, 0.4, 0.6, 0.8, 1.0]), (7, [0, 2, 4, 6, 8]),
    (95, [0, 20, 40, 60, 80, 100]), (1234, [0, 250, 500, 750, 1000, 1250]),
])
def test_nice_ticks(high: float, ticks: list[float]) -> None:
    assert svg.nice_ticks(high) == ticks


def test_time_ticks_are_round_in_the_zone() -> None:
    tz = dt.timezone(dt.timedelta(hours=5, minutes=30))
    ticks = svg.time_ticks(T0, T0 + 6 * 60 * MIN, tz)
    labels = [svg.time_label(t, tz, 6 * 60 * MIN) for t in ticks]
    assert labels and all(label.endswith(":00") or label.endswith(":30") for label in labels)
    assert 3 <= len(ticks) <= 8


def test_format_value() -> None:
    assert [svg.format_value(v, "ms") for v in (0.123, 12.34, 850, 1234, 123_456)] == [
        "0.123 ms", "12.3 ms", "850 ms", "1.23 s", "123 s"]
    assert svg.format_value(0.034, "%") == "3.4%"
    assert svg.format_value(8940, "/min") == "8,940/min"
    assert svg.format_value(None) == "–"
