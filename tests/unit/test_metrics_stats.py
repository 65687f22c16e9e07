"""edge_agent/metrics.py: the hot-path counters, the status document, the Prometheus text,
the cached drift read and its cost on the hot path."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.metrics import (
    AgentView,
    DriftReader,
    LineStats,
    metrics_registry,
    render_metrics,
    status_document,
)


def test_stats_count_outcomes_and_file_latencies_into_cumulative_buckets() -> None:
    stats = LineStats(buckets_ms=(1, 10, 100))
    for outcome, ms in [("pass", 0.5), ("pass", 1.0), ("fail", 5.0), ("error", 500.0)]:
        stats.add(outcome, ms)
    snap = stats.snapshot()
    assert snap.verdicts == {"pass": 2, "fail": 1, "uncertain": 0, "error": 1}
    # An upper bound is inclusive (Prometheus "le"): 1.0 falls into the 1 ms bucket.
    assert snap.cumulative == (2, 3, 3, 4)
    assert snap.count == 4
    assert snap.latency_sum_ms == pytest.approx(506.5)


@pytest.mark.parametrize("buckets", [(), (5, 5), (10, 1)], ids=["empty", "equal", "decreasing"])
def test_bad_buckets_are_refused(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="buckets_ms"):
        LineStats(buckets_ms=buckets)


def test_adding_a_verdict_costs_microseconds() -> None:
    stats = LineStats()
    n = 20_000
    started = time.perf_counter()
    for _ in range(n):
        stats.add("pass", 7.5)
    per_call_us = (time.perf_counter() - started) / n * 1e6
    # About 1 us here; the bound leaves room for a loaded machine and is still far
    # below one frame's inference (milliseconds).
    assert per_call_us < 50, per_call_us
    assert stats.snapshot().count == n


def _view(tmp_path: Path, clock_value: list[float]) -> AgentView:
    view = AgentView("cam-1", tmp_path, clock=lambda: clock_value[0])
    view.stats.add("fail", 12.0)
    view.stats.add("pass", 3.0)
    view.api_stats.add("error", 0.1)
    return view


def test_status_before_the_line_is_attached_names_no_model(tmp_path: Path) -> None:
    clock = [100.0]
    view = _view(tmp_path, clock)
    clock[0] = 112.5
    doc = status_document(view.snapshot())
    assert doc["device"] == "cam-1"
    assert doc["model"] == ""
    assert doc["uptime_s"] == 12.5
    counters = doc["counters"]
    assert isinstance(counters, dict)
    assert counters["verdicts"] == {"pass": 1, "fail": 1, "uncertain": 0, "error": 0}
    assert counters["api_inspections"] == {"pass": 0, "fail": 0, "uncertain": 0, "error": 1}
    assert doc["update"] == {"state": "off", "since": None, "pending": None}
    assert doc["drift"] == {"drifting": False, "features": [], "detail": None, "problem": None}
    json.dumps(doc)  # it is what GET /v1/status sends


def test_prometheus_text_parses_and_carries_the_counts(tmp_path: Path) -> None:
    (tmp_path / "drift.json").write_text(
        json.dumps({"v": 1, "drifting": True, "features": ["brightness"], "alarms": []})
    )
    view = _view(tmp_path, [0.0])
    text = render_metrics(metrics_registry(view)).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("edgefleet_agent_verdicts_total", (("outcome", "fail"),))] == 1
    assert samples[("edgefleet_agent_api_inspections_total", (("outcome", "error"),))] == 1
    assert samples[("edgefleet_agent_inference_latency_seconds_count", ())] == 2
    assert samples[("edgefleet_agent_inference_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("edgefleet_agent_inference_latency_seconds_sum", ())] == pytest.approx(0.015)
    assert samples[("edgefleet_agent_update_state", (("state", "off"),))] == 1
    assert samples[("edgefleet_agent_update_state", (("state", "idle"),))] == 0
    assert samples[("edgefleet_agent_drifting", ())] == 1
    assert samples[("edgefleet_agent_drift_flag", (("feature", "brightness"),))] == 1
    assert samples[("edgefleet_agent_queue_depth", (("queue", "pipeline"),))] == 0


def test_drift_json_is_read_at_most_once_per_interval(tmp_path: Path) -> None:
    now = [0.0]
    reader = DriftReader(tmp_path, interval_s=1.0, clock=lambda: now[0])
    assert reader.read().drifting is False  # no file yet
    (tmp_path / "drift.json").write_text(json.dumps({"drifting": True, "features": ["rgb_r"]}))
    now[0] = 0.5
    assert reader.read().drifting is False  # cached
    now[0] = 1.0
    snap = reader.read()
    assert snap.drifting is True and snap.features == ("rgb_r",)


def test_a_torn_drift_file_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "drift.json").write_text('{"drifting": tr')
    snap = DriftReader(tmp_path).read()
    assert snap.drifting is False
    assert snap.problem is not None and "drift.json" in snap.problem
