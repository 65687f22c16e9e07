"""The local drift alarm: flags per feature, the hold before a flag clears, drift.json."""

from __future__ import annotations

import json
from pathlib import Path

from edge_agent.core.drift import DriftStatus, Finding
from edge_agent.telemetry.alarm import DriftAlarm, read_drift_file


def _finding(feature: str, seq: int, test: str = "cusum") -> Finding:
    return Finding(feature, test, "up", 6.2, 5.0, 1.4, None, seq - 2)


def _flags(alarm: DriftAlarm) -> tuple[str, ...]:
    return alarm.flags  # a call: mypy would narrow the property between assertions


def _status(seq: int, *features: str) -> DriftStatus:
    return DriftStatus(seq, tuple(_finding(f, seq) for f in features), (), None)


def test_a_flag_is_raised_held_and_cleared(tmp_path: Path) -> None:
    changes: list[tuple[str, ...]] = []
    alarm = DriftAlarm(tmp_path / "drift.json", hold_windows=2, on_change=changes.append)
    alarm.start("m@1", 100.0)
    alarm.observe(_status(1), 101.0)
    assert not _flags(alarm) and changes == []
    alarm.observe(_status(2, "brightness", "defect_rate"), 102.0)
    assert _flags(alarm) == ("brightness", "defect_rate")
    state = read_drift_file(tmp_path / "drift.json")
    assert state is not None and state["drifting"] is True and state["last_window"] == 2
    alarms = state["alarms"]
    assert isinstance(alarms, list) and alarms[0]["feature"] == "brightness"
    assert alarms[0]["effect"] == 1.4 and alarms[0]["since_seq"] == 0
    # A CUSUM restarts after it alarms: one quiet window does not clear the flag.
    alarm.observe(_status(3, "defect_rate"), 103.0)
    assert _flags(alarm) == ("brightness", "defect_rate")
    alarm.observe(_status(4, "defect_rate"), 104.0)
    assert _flags(alarm) == ("defect_rate",)
    alarm.observe(_status(5), 105.0)
    alarm.observe(_status(6), 106.0)
    assert not _flags(alarm)
    assert changes == [("brightness", "defect_rate"), ("defect_rate",), ()]
    state = read_drift_file(tmp_path / "drift.json")
    assert state is not None and state["drifting"] is False and state["alarms"] == []


def test_skipped_windows_change_nothing(tmp_path: Path) -> None:
    alarm = DriftAlarm(tmp_path / "drift.json", hold_windows=1)
    alarm.start("m@1", 1.0)
    alarm.observe(_status(1, "contrast"), 2.0)
    alarm.observe(DriftStatus(2, (), (), None, skipped="repeated seq"), 3.0)
    assert _flags(alarm) == ("contrast",)


def test_a_new_model_clears_the_flags(tmp_path: Path) -> None:
    changes: list[tuple[str, ...]] = []
    alarm = DriftAlarm(tmp_path / "drift.json", on_change=changes.append)
    alarm.start("m@1", 1.0)
    alarm.observe(_status(1, "sharpness"), 2.0)
    alarm.start("m@2", 3.0)
    assert _flags(alarm) == () and changes == [("sharpness",), ()]
    state = json.loads((tmp_path / "drift.json").read_text())
    assert state["model"] == "m@2" and state["drifting"] is False
