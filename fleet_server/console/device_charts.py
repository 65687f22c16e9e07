"""The device page's charts, from ``FleetViews`` data: throughput, verdict rates, latency
and each image feature against its reference band, with the device's drift alerts on
the time axis.

Pure: windows, bands and alerts in, ``(chart id, heading, svg)`` triples out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleet_server.console.charts import Chart, Marker, Series, render_time_chart

FEATURE_TITLES = {
    "brightness": ("Brightness", "gray level"),
    "contrast": ("Contrast (RMS)", "gray level"),
    "sharpness": ("Sharpness (log)", ""),
    "clipped": ("Clipped pixels", "share"),
    "r_mean": ("Red mean", "level"),
    "g_mean": ("Green mean", "level"),
    "b_mean": ("Blue mean", "level"),
    "p_defect": ("P(defect) mean", ""),
}
Pick = Callable[[Mapping[str, Any]], Any]
CHART_FEATURES = ("brightness", "contrast", "sharpness", "r_mean", "g_mean", "b_mean")


@dataclass(frozen=True, slots=True)
class RenderedChart:
    id: str
    heading: str
    svg: str


def device_charts(
    windows: Sequence[Mapping[str, Any]],
    bands: Mapping[str, tuple[float, float]] | None,
    alerts: Sequence[Mapping[str, Any]],
) -> list[RenderedChart]:
    """Charts of a device's windows (oldest first, as ``FleetViews.device_windows``)."""
    xs = [float(w["t1"]) for w in windows if isinstance(w.get("t1"), int)]
    rows = [w for w in windows if isinstance(w.get("t1"), int)]
    markers = _markers(alerts)
    charts = [
        RenderedChart(
            "chart-throughput",
            "Throughput (frames/s)",
            render_time_chart(
                Chart(
                    "Throughput per window",
                    [Series("frames/s", _points(xs, rows, lambda w: w["throughput"]))],
                    unit="frames/s",
                    floor_zero=True,
                    markers=[m for m, _ in markers],
                ),
                chart_id="chart-throughput",
            ),
        ),
        RenderedChart(
            "chart-rates",
            "Verdicts (% of inspected frames)",
            render_time_chart(
                Chart(
                    "Pass, fail, uncertain and error rates per window",
                    [
                        Series(name, _points(xs, rows, _rate(name)), tone)
                        for name, tone in (
                            ("pass", "tone-good"),
                            ("fail", "tone-bad"),
                            ("uncertain", "tone-warn"),
                            ("error", "tone-5"),
                        )
                    ],
                    unit="%",
                    y_range=(0.0, 100.0),
                    markers=[m for m, f in markers if f == "defect_rate"],
                    y_format=lambda v: f"{v:.0f}%",
                ),
                chart_id="chart-rates",
            ),
        ),
        RenderedChart(
            "chart-latency",
            "Latency (ms)",
            render_time_chart(
                Chart(
                    "Inference latency per window, p50 and p99",
                    [
                        Series("p50", _points(xs, rows, lambda w: w["latency_p50_ms"])),
                        Series("p99", _points(xs, rows, lambda w: w["latency_p99_ms"]), "tone-2"),
                    ],
                    unit="ms",
                    floor_zero=True,
                ),
                chart_id="chart-latency",
            ),
        ),
    ]
    for feature in CHART_FEATURES:
        title, unit = FEATURE_TITLES[feature]
        chart_id = f"chart-{feature.replace('_', '-')}"
        charts.append(
            RenderedChart(
                chart_id,
                f"{title} ({unit})" if unit else title,
                render_time_chart(
                    Chart(
                        f"{title}: window mean against the reference band",
                        [Series("window mean", _points(xs, rows, _mean(feature)), "tone-3")],
                        unit=unit,
                        band=None if bands is None else bands.get(feature),
                        band_label="reference mean ±3 sd",
                        markers=[Marker(m.x, m.label, strong=(f == feature)) for m, f in markers],
                    ),
                    chart_id=chart_id,
                ),
            )
        )
    return charts


def _markers(alerts: Sequence[Mapping[str, Any]]) -> list[tuple[Marker, str]]:
    out = []
    for alert in alerts:
        opened = alert.get("opened_at")
        if isinstance(opened, datetime):
            feature = str(alert.get("feature", ""))
            label = f"#{alert.get('id')} {feature} {alert.get('direction', '')}".strip()
            out.append((Marker(opened.timestamp(), label), feature))
    return out


def _points(
    xs: Sequence[float], rows: Sequence[Mapping[str, Any]], value: Pick
) -> list[tuple[float, float | None]]:
    out: list[tuple[float, float | None]] = []
    for x, row in zip(xs, rows, strict=True):
        y = value(row)
        out.append((x, float(y) if isinstance(y, int | float) else None))
    return out


def _rate(name: str) -> Pick:
    def pick(w: Mapping[str, Any]) -> float | None:
        rate = w["rates"].get(name)
        return None if rate is None else 100.0 * rate

    return pick


def _mean(feature: str) -> Pick:
    def pick(w: Mapping[str, Any]) -> float | None:
        value = w["means"].get(feature)
        return value if isinstance(value, float) else None

    return pick
