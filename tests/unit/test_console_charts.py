"""The console's SVG charts and the window figures they plot: well-formed SVG with one
point per value, gaps, bands, alert markers and escaping; ticks, heat classes; latency
percentiles and window summaries from stored window documents."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

import pytest

from edge_agent.protocol.manifest import FeatureReference
from edge_agent.protocol.telemetry import LATENCY_EDGES_MS, Moments, TelemetryWindow, encode_window
from fleet_server.console.charts import (
    MAX_POINTS,
    Chart,
    Marker,
    Series,
    heat_class,
    nice_ticks,
    render_time_chart,
)
from fleet_server.console.device_charts import CHART_FEATURES, device_charts
from fleet_server.storage import window_summary as ws

SVG = "{http://www.w3.org/2000/svg}"
T0 = 1_780_000_000.0


def _parse(svg: str) -> ET.Element:
    # The console serves the SVG inline in HTML; parsing it as XML (with the namespace
    # added) proves it is well formed and lets the tests count elements.
    return ET.fromstring(svg.replace("<svg ", f'<svg xmlns="{SVG[1:-1]}" ', 1))


def _all(root: ET.Element, tag: str, css: str | None = None) -> list[ET.Element]:
    found = root.iter(f"{SVG}{tag}")
    return [e for e in found if css is None or css in (e.get("class") or "").split()]


def _points(n: int, start: float = 10.0) -> list[tuple[float, float | None]]:
    return [(T0 + 60 * i, start + i) for i in range(n)]


def test_one_circle_per_value_and_one_polyline_per_unbroken_run() -> None:
    points = _points(10)
    points[4] = (points[4][0], None)  # a window without the figure: a gap
    svg = render_time_chart(Chart("Brightness", [Series("mean", points)]), chart_id="c1")
    root = _parse(svg)

    assert len(_all(root, "circle", "pt")) == 9
    polylines = _all(root, "polyline", "line")
    assert [len((p.get("points") or "").split()) for p in polylines] == [4, 5]
    assert root.get("role") == "img"
    assert root.get("aria-labelledby") == "c1-title c1-desc"
    assert root.find(f"{SVG}title") is not None
    assert "10 points" in svg  # the description counts the windows, gaps included


def test_points_are_placed_left_to_right_and_higher_values_higher() -> None:
    svg = render_time_chart(Chart("t", [Series("s", _points(5))]), chart_id="c")
    circles = _all(_parse(svg), "circle", "pt")
    xs = [float(c.get("cx") or "nan") for c in circles]
    ys = [float(c.get("cy") or "nan") for c in circles]
    assert xs == sorted(xs)
    assert ys == sorted(ys, reverse=True)  # SVG y grows downwards


def test_band_is_drawn_and_widens_the_axis_to_show_it() -> None:
    chart = Chart("b", [Series("mean", _points(3, 50.0))], band=(40.0, 70.0), band_label="ref")
    root = _parse(render_time_chart(chart, chart_id="c"))
    bands = _all(root, "rect", "band")
    assert len(bands) == 1
    assert float(bands[0].get("height") or 0) > 0
    labels = [t.text for t in _all(root, "text") if t.text]
    assert "40" in labels or "40.0" in labels  # the band's low end is on the axis


def test_markers_in_a_burst_share_one_label_and_the_strong_one_names_itself() -> None:
    markers = [
        Marker(T0 + 600, "#1 r_mean down"),
        Marker(T0 + 620, "#2 brightness down", strong=True),
        Marker(T0 + 640, "#3 g_mean down"),
    ]
    chart = Chart("b", [Series("mean", _points(30))], markers=markers)
    root = _parse(render_time_chart(chart, chart_id="c"))
    assert len(_all(root, "line")) >= 3
    assert len([g for g in _all(root, "g") if "marker" in (g.get("class") or "")]) == 3
    labels = [t.text for t in _all(root, "text", "marker-label")]
    assert labels == ["#2 brightness down (+2)"]

    plain = Chart("b", [Series("mean", _points(30))], markers=[markers[0], markers[2]])
    labels = [t.text for t in _all(_parse(render_time_chart(plain, chart_id="c")), "text")]
    assert "2 alerts" in labels


def test_markers_outside_the_time_range_are_left_out() -> None:
    chart = Chart("b", [Series("s", _points(5))], markers=[Marker(T0 - 3600, "#1 old")])
    assert "#1 old" not in render_time_chart(chart, chart_id="c")


def test_text_is_escaped() -> None:
    chart = Chart(
        "<script>alert(1)</script>",
        [Series('a"b<c>', _points(2))],
        markers=[Marker(T0 + 30, "<b>x</b>")],
    )
    svg = render_time_chart(chart, chart_id="c")
    assert "<script>" not in svg and "<b>" not in svg
    _parse(svg)  # still well formed


def test_no_data_renders_a_labelled_empty_chart() -> None:
    root = _parse(render_time_chart(Chart("empty", [Series("s", [])]), chart_id="c"))
    assert _all(root, "circle") == []
    assert [t.text for t in _all(root, "text", "empty")] == ["no data yet"]
    only_gaps = Chart("gaps", [Series("s", [(T0, None), (T0 + 60, None)])])
    assert _all(_parse(render_time_chart(only_gaps, chart_id="c")), "circle") == []


def test_a_single_point_still_gets_a_finite_plot() -> None:
    root = _parse(render_time_chart(Chart("one", [Series("s", [(T0, 5.0)])]), chart_id="c"))
    (circle,) = _all(root, "circle", "pt")
    assert math.isfinite(float(circle.get("cx") or "nan"))
    assert math.isfinite(float(circle.get("cy") or "nan"))


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([(T0 + i, 1.0) for i in range(MAX_POINTS + 1)], "max 1000"),
        ([(math.nan, 1.0)], "non-finite x"),
    ],
    ids=["too-many-points", "nan-x"],
)
def test_bad_series_are_refused(points: list[tuple[float, float | None]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_time_chart(Chart("bad", [Series("s", points)]), chart_id="c")


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0.0, 100.0, [0.0, 25.0, 50.0, 75.0, 100.0]),
        (0.0, 1.0, [0.0, 0.25, 0.5, 0.75, 1.0]),
        (53.2, 66.9, [55.0, 60.0, 65.0]),
        (-3.0, 3.0, [-2.0, 0.0, 2.0]),
        (0.0, 7.0, [0.0, 2.0, 4.0, 6.0]),
        (5.0, 5.0, [5.0]),
    ],
)
def test_nice_ticks(lo: float, hi: float, expected: list[float]) -> None:
    assert nice_ticks(lo, hi, 5) == pytest.approx(expected)


def test_nice_ticks_refuses_a_reversed_range() -> None:
    with pytest.raises(ValueError, match="cannot make ticks"):
        nice_ticks(2.0, 1.0)


@pytest.mark.parametrize(
    ("shift", "css"),
    [
        (None, "heat-none"),
        (math.nan, "heat-none"),
        (0.4, "heat-0"),
        (-0.99, "heat-0"),
        (1.5, "heat-up-1"),
        (-2.5, "heat-down-2"),
        (4.0, "heat-up-3"),
        (-12.0, "heat-down-4"),
    ],
)
def test_heat_class(shift: float | None, css: str) -> None:
    assert heat_class(shift) == css


# -- window figures ---------------------------------------------------------------------


def _latency(counts_by_bin: dict[int, int]) -> list[int]:
    counts = [0] * (len(LATENCY_EDGES_MS) + 1)
    for index, n in counts_by_bin.items():
        counts[index] = n
    return counts


@pytest.mark.parametrize(
    ("counts", "q", "expected"),
    [
        # 100 frames in bin 2 (2..3 ms): the median is half way through it.
        (_latency({2: 100}), 0.5, 2.5),
        (_latency({2: 100}), 0.99, 2.99),
        # Underflow bin spans 0..1 ms.
        (_latency({0: 50, 1: 50}), 0.25, 0.5),
        # The overflow bin has no upper edge: the last edge is a lower bound.
        (_latency({3: 90, 12: 10}), 0.99, 100.0),
        (_latency({}), 0.5, None),
        ([1, 2, 3], 0.5, None),
        (None, 0.5, None),
    ],
    ids=["median", "p99", "underflow", "overflow", "empty", "wrong-length", "none"],
)
def test_latency_quantile(counts: list[int] | None, q: float, expected: float | None) -> None:
    got = ws.latency_quantile(counts, q)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def _document(**overrides: object) -> dict[str, object]:
    window = TelemetryWindow(
        seq=7,
        t0=1_780_000_000,
        t1=1_780_000_060,
        model="m@1",
        edge="0.1.0",
        ref="0123456789abcdef",
        counts={"pass": 170, "fail": 20, "uncertain": 9, "error": 1, "dropped": 3},
        moments={"brightness": Moments(199, 199 * 64.0, 199 * 64.0**2 + 198 * 4.0)},
        latency=_latency({2: 150, 5: 50}),
    )
    document: dict[str, object] = json.loads(encode_window(window))
    document.update(overrides)
    return document


def test_summarize_window_reads_the_wire_document() -> None:
    got = ws.summarize_window(_document())
    assert got["seq"] == 7 and got["t1"] == 1_780_000_060 and got["model"] == "m@1"
    assert got["frames"] == 200  # dropped frames were never inspected
    assert got["rates"] == pytest.approx(
        {"pass": 0.85, "fail": 0.10, "uncertain": 0.045, "error": 0.005}
    )
    assert got["throughput"] == pytest.approx(200 / 60)
    assert got["latency_p50_ms"] == pytest.approx(2 + 100 / 150)
    assert got["means"]["brightness"] == pytest.approx(64.0)
    assert got["means"]["contrast"] is None


def test_summarize_window_tolerates_odd_stored_documents() -> None:
    got = ws.summarize_window(_document(counts="broken", moments={"brightness": [0, 0, 0]}))
    assert got["frames"] == 0
    assert got["rates"]["pass"] is None
    assert got["means"]["brightness"] is None


def _reference(mean: float = 64.0, std: float = 4.0) -> FeatureReference:
    return FeatureReference(
        edges=[float(e) for e in range(0, 257, 8)],
        counts=[0] * 34,
        mean=mean,
        std=std,
        window_frames=100,
        window_mean_std=0.5,
    )


def test_band_and_shift_use_the_window_mean_sigma() -> None:
    ref = _reference()
    # sigma_W = max(0.5, 4 / sqrt(100)) = 0.5 for the profile's 100-frame windows.
    assert ws.reference_band(ref) == pytest.approx((62.5, 65.5))
    # A 400-frame window is judged like a 100-frame one (never a narrower band).
    assert ws.reference_band(ref, 400) == pytest.approx((62.5, 65.5))
    # A 25-frame window has twice the sigma.
    assert ws.reference_band(ref, 25) == pytest.approx((61.0, 67.0))
    shifted = _document(moments={"brightness": [100, 100 * 62.0, 100 * 62.0**2]})
    assert ws.standardized_shift(shifted, "brightness", ref) == pytest.approx(-4.0)
    assert ws.standardized_shift(shifted, "contrast", ref) is None


def test_device_charts_draw_every_chart_with_its_points_band_and_alerts() -> None:
    windows = [
        ws.summarize_window(_document(seq=i, t0=1_780_000_000 + 60 * i, t1=1_780_000_060 + 60 * i))
        for i in range(12)
    ]
    bands = {"brightness": (62.5, 65.5)}
    alerts = [
        {
            "id": 4,
            "feature": "brightness",
            "direction": "down",
            "opened_at": datetime.fromtimestamp(1_780_000_400, timezone.utc),
        }
    ]
    charts = device_charts(windows, bands, alerts)
    ids = [c.id for c in charts]
    assert ids[:3] == ["chart-throughput", "chart-rates", "chart-latency"]
    assert len(ids) == 3 + len(CHART_FEATURES)
    by_id = {c.id: _parse(c.svg) for c in charts}
    brightness = by_id["chart-brightness"]
    assert len(_all(brightness, "circle", "pt")) == 12
    assert len(_all(brightness, "rect", "band")) == 1
    assert [t.text for t in _all(brightness, "text", "marker-label")] == ["#4 brightness down"]
    # No contrast moments in these windows: an empty chart, said so.
    contrast = by_id["chart-contrast"]
    assert _all(contrast, "circle", "pt") == []
    assert [t.text for t in _all(contrast, "text", "empty")] == ["no data yet"]
    rates = by_id["chart-rates"]
    assert len(_all(rates, "circle", "pt")) == 4 * 12
