"""The reporter feeds the local drift check its own short windows, apart from the
published ones, and starts both afresh when the model changes."""

from __future__ import annotations

from pathlib import Path

from edge_agent.core.drift import DriftStatus
from edge_agent.inspect import Inspector
from edge_agent.pipeline import Inspection, Pipeline
from edge_agent.protocol.telemetry import TelemetryWindow
from edge_agent.sources.synthetic import SyntheticLine
from edge_agent.telemetry.alarm import DriftAlarm
from edge_agent.telemetry.reporter import TelemetryReporter, WindowMonitor
from tests.integration.reference import ONNX_BUNDLE, UNSEEN_SEED


class _Recording:
    """A monitor that records the windows it is given and never alarms."""

    def __init__(self) -> None:
        self.windows: list[TelemetryWindow] = []

    def update(self, window: TelemetryWindow) -> DriftStatus:
        self.windows.append(window)
        return DriftStatus(seq=window.seq, alarms=(), tests=(), performance=None)


def test_check_windows_are_short_and_separate_from_published_windows(tmp_path: Path) -> None:
    inspector = Inspector.open(ONNX_BUNDLE)
    items: list[Inspection] = list(
        Pipeline(inspector).run(SyntheticLine(seed=UNSEEN_SEED, size=(160, 120), count=260))
    )
    monitors: list[_Recording] = []

    def monitor_for(_inspector: Inspector) -> WindowMonitor:
        monitors.append(_Recording())
        return monitors[-1]

    reporter = TelemetryReporter(
        edge="0.1.0",
        window_frames=200,
        window_s=3600.0,
        check_frames=60,
        spool=None,
        alarm=DriftAlarm(tmp_path / "drift.json"),
        monitor_for=monitor_for,
    )
    t0 = 1_800_000_000.0
    try:
        reporter.start(inspector, t0)
        for i, item in enumerate(items):
            reporter.add(item, 0, t0 + i * 0.01)
        assert reporter.flush(10)
    finally:
        reporter.finish(t0 + 10.0)
        inspector.close()
    (monitor,) = monitors
    # 260 frames: published windows of 200 and, at the stop, 60 (over the floor); check
    # windows of 60: four full ones, the 20 frames left over are let go at the stop.
    assert reporter.windows == 2 and reporter.frames_in_windows == 260
    assert [w.seq for w in monitor.windows] == [0, 1, 2, 3]
    assert all(w.frames == 60 for w in monitor.windows)
    assert all(w.moments["brightness"].n == 60 for w in monitor.windows)
