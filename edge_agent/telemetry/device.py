"""Builds the device's telemetry path from plain values (``service.py`` reads the config).

    inspections -> TelemetryReporter -> Spool -> WindowPublisher -> devices/{id}/telemetry
                                     -> DriftMonitor -> DriftAlarm -> drift.json, log
    StatePublisher -> devices/{id}/state (retained; the transport's will says offline)

Without a broker (``transport`` None) windows are still built and checked by the local
drift monitor, so a line that is never connected still raises its local alarm; nothing
is spooled. With ``enabled`` False only the retained state is kept (when connected).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edge_agent import __version__
from edge_agent.inspect import Inspector
from edge_agent.pipeline import Inspection
from edge_agent.protocol import topics
from edge_agent.telemetry.alarm import DRIFT_FILE, DriftAlarm
from edge_agent.telemetry.presence import StatePublisher
from edge_agent.telemetry.publisher import WindowPublisher
from edge_agent.telemetry.reporter import MonitorFactory, TelemetryReporter, drift_monitor_for
from edge_agent.telemetry.spool import Spool, SpoolCounts
from edge_agent.transport import MqttTransport

OFFLINE_TIMEOUT_S = 2.0


def spool_dir(state_dir: Path) -> Path:
    return state_dir / "telemetry" / "spool"


def drift_path(state_dir: Path) -> Path:
    return state_dir / DRIFT_FILE


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    device_id: str
    profile: str
    line: str | None
    state_dir: Path
    enabled: bool = True
    window_frames: int = 500
    window_s: float = 60.0
    check_frames: int = 100
    spool_max_bytes: int = 16 * 1024 * 1024
    spool_max_windows: int = 10_000
    drift_hold_windows: int = 3
    state_interval_s: float = 5.0


class DeviceTelemetry:
    """Telemetry, local drift alarm and retained state for one agent.

    Construct before ``transport.start()`` (the state goes out from its connect hook).

    Args:
        settings: plain values from the config.
        transport: the agent's one MQTT connection; None without a broker.
        first_seq: seq of the first window on a device with no spool yet.
        monitor_for: the local drift monitor per model.

    Raises:
        SpoolError, OSError: the spool directory is unusable (named).
    """

    def __init__(
        self,
        settings: TelemetrySettings,
        transport: MqttTransport | None,
        *,
        first_seq: int = 0,
        monitor_for: MonitorFactory = drift_monitor_for,
    ) -> None:
        self.settings = settings
        self.spool: Spool | None = None
        self.publisher: WindowPublisher | None = None
        self.state: StatePublisher | None = None
        self.reporter: TelemetryReporter | None = None
        if transport is not None and settings.enabled:
            self.spool = Spool(
                spool_dir(settings.state_dir),
                max_bytes=settings.spool_max_bytes,
                max_windows=settings.spool_max_windows,
                first_seq=first_seq,
            )
        if transport is not None:
            self.state = StatePublisher(
                transport,
                settings.device_id,
                edge=__version__,
                profile=settings.profile,
                line=settings.line,
                spool_counts=self.counts,
                min_interval_s=settings.state_interval_s,
            )
            transport.add_connect_hook(self.state.on_connect)
            if self.spool is not None:
                self.publisher = WindowPublisher(
                    self.spool,
                    transport,
                    topics.telemetry(settings.device_id),
                    on_drained=self.state.refresh,
                )
        if settings.enabled:
            state = self.state
            alarm = DriftAlarm(
                drift_path(settings.state_dir),
                hold_windows=settings.drift_hold_windows,
                on_change=None if state is None else state.set_drift,
            )
            self.reporter = TelemetryReporter(
                edge=__version__,
                window_frames=settings.window_frames,
                window_s=settings.window_s,
                check_frames=settings.check_frames,
                spool=self.spool,
                alarm=alarm,
                monitor_for=monitor_for,
                on_window=None if self.publisher is None else self.publisher.wake,
                on_model=None if state is None else state.set_model,
            )

    def counts(self) -> SpoolCounts | None:
        return None if self.spool is None else self.spool.counts()

    def start(self, inspector: Inspector, now: float) -> None:
        """Begin with the model the line starts on; start the publisher thread."""
        if self.state is not None:
            self.state.set_model(inspector.manifest.id)
        if self.reporter is not None:
            self.reporter.start(inspector, now)
        if self.publisher is not None:
            self.publisher.start()

    def add(self, item: Inspection, dropped_total: int, now: float) -> None:
        if self.reporter is not None:
            self.reporter.add(item, dropped_total, now)
        if self.state is not None:
            self.state.tick()

    def tick(self, dropped_total: int, now: float) -> None:
        if self.reporter is not None:
            self.reporter.tick(dropped_total, now)
        if self.state is not None:
            self.state.tick()

    def stop(self, now: float | None = None) -> None:
        """Close the last window (if it reaches the floor), give in-flight windows a
        moment to be acknowledged, and say OFFLINE. The caller stops the transport."""
        if self.reporter is not None:
            self.reporter.finish(time.time() if now is None else now)
        if self.publisher is not None:
            self.publisher.wake()
            self.publisher.stop(drain_s=OFFLINE_TIMEOUT_S)
        if self.state is not None:
            self.state.publish_offline(OFFLINE_TIMEOUT_S)
