"""The local drift alarm: the device's own drift check raises a flag even when offline.

``DriftAlarm.observe`` takes each ``DriftStatus`` of the local monitor. A finding raises
the flag of its feature (a log line ``event=drift`` with the feature, test and effect);
the flag stays up while the monitor keeps alarming on that feature and is cleared after
``hold_windows`` consecutive windows without an alarm on it (``event=drift_cleared``).
The hold is there because a CUSUM restarts from zero after it alarms: a shift that
persists alarms again a window or a few later, and the flag should not flicker between.

The state after every window is written to ``drift.json`` (atomically, one small file a
window), which ``edge-agent status`` and a local API read; a change of the flagged set
is reported to ``on_change`` (the retained device state). The file
describes windows and detectors only, never a frame.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edge_agent.core.drift import DriftStatus, Finding, PerformanceEstimate
from edge_agent.durable import write_atomic

log = logging.getLogger("edge_agent.telemetry")

DRIFT_FILE: Final = "drift.json"
_VERSION: Final = 1


@dataclass(slots=True)
class _Flag:
    finding: Finding
    raised_at: float  # unix time the flag went up
    last_seq: int  # last window that alarmed
    quiet: int = 0  # windows since, without an alarm on this feature


class DriftAlarm:
    """Drift flags per feature, kept in ``path`` (``state_dir/drift.json``).

    Args:
        path: the state file, rewritten on every change.
        hold_windows: windows without an alarm before a flag clears (>= 1).
        on_change: called with the sorted flagged features whenever that set changes.
    """

    def __init__(
        self,
        path: Path,
        *,
        hold_windows: int = 3,
        on_change: Callable[[tuple[str, ...]], None] | None = None,
    ) -> None:
        if hold_windows < 1:
            raise ValueError(f"hold_windows must be >= 1, got {hold_windows}")
        self.path = path
        self.hold_windows = hold_windows
        self._on_change = on_change
        self._flags: dict[str, _Flag] = {}
        self._model = ""
        self._last_seq: int | None = None
        self._performance: PerformanceEstimate | None = None
        self._updated = 0.0

    @property
    def flags(self) -> tuple[str, ...]:
        """Features (or ``defect_rate``) flagged now, sorted."""
        return tuple(sorted(self._flags))

    def start(self, model: str, now: float) -> None:
        """A new model (or a fresh start): no flags; the file says so.

        Raises:
            OSError: the state file cannot be written.
        """
        cleared = self.flags
        for feature in cleared:
            log.info(
                "drift flag cleared: model changed",
                extra={"event": "drift_cleared", "feature": feature, "reason": "model changed"},
            )
        self._flags.clear()
        self._model, self._last_seq, self._performance = model, None, None
        self._write(now)
        if cleared and self._on_change is not None:
            self._on_change(())

    def observe(self, status: DriftStatus, now: float) -> None:
        """Take one window's result.

        Raises:
            OSError: the state file cannot be written (the flags are updated anyway).
        """
        if status.skipped is not None:
            return
        before = self.flags
        self._last_seq = status.seq
        self._performance = status.performance
        alarming: dict[str, Finding] = {}
        for finding in status.alarms:
            alarming.setdefault(finding.feature, finding)
            log.warning(
                "drift",
                extra={
                    "event": "drift",
                    "feature": finding.feature,
                    "test": finding.test,
                    "direction": finding.direction,
                    "effect": _finite(finding.effect),
                    "statistic": _finite(finding.statistic),
                    "threshold": _finite(finding.threshold),
                    "p_value": _finite(finding.p_value),
                    "since_seq": finding.since_seq,
                    "seq": status.seq,
                    "model": self._model,
                },
            )
        for feature, flag in list(self._flags.items()):
            if feature in alarming:
                continue
            flag.quiet += 1
            if flag.quiet >= self.hold_windows:
                del self._flags[feature]
                log.info(
                    "drift flag cleared",
                    extra={
                        "event": "drift_cleared",
                        "feature": feature,
                        "quiet_windows": flag.quiet,
                        "seq": status.seq,
                    },
                )
        for feature, finding in alarming.items():
            old = self._flags.get(feature)
            raised = old.raised_at if old is not None else now
            self._flags[feature] = _Flag(finding, raised, status.seq)
        after = self.flags
        try:
            self._write(now)  # every window: status shows the last window checked
        finally:
            if after != before and self._on_change is not None:
                self._on_change(after)

    def _write(self, now: float) -> None:
        self._updated = now
        write_atomic(self.path, json.dumps(self.describe(), indent=1).encode() + b"\n")

    def describe(self) -> dict[str, object]:
        """What ``drift.json`` holds."""
        perf = self._performance
        return {
            "v": _VERSION,
            "updated": round(self._updated, 3),
            "model": self._model,
            "drifting": bool(self._flags),
            "features": list(self.flags),
            "last_window": self._last_seq,
            "alarms": [
                {
                    "feature": feature,
                    "test": flag.finding.test,
                    "direction": flag.finding.direction,
                    "statistic": _finite(flag.finding.statistic),
                    "threshold": _finite(flag.finding.threshold),
                    "effect": _finite(flag.finding.effect),
                    "p_value": _finite(flag.finding.p_value),
                    "since_seq": flag.finding.since_seq,
                    "last_seq": flag.last_seq,
                    "raised_at": round(flag.raised_at, 3),
                    "quiet_windows": flag.quiet,
                }
                for feature, flag in sorted(self._flags.items())
            ],
            "performance": None
            if perf is None
            else {
                "accuracy": _finite(perf.accuracy),
                "frames": perf.frames,
                "valid": perf.valid,
                "reason": perf.reason,
            },
        }


def read_drift_file(path: Path) -> dict[str, object] | None:
    """The content of a ``drift.json``; None if there is none.

    Raises:
        ValueError: the file is not a JSON object (names the file).
        OSError: it cannot be read.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not JSON: {e}") from e
    if not isinstance(document, dict):
        raise ValueError(f"{path}: not a JSON object")
    return document


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 6)
