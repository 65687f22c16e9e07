"""Per-inspection glue between the line and telemetry (the agent's loop calls it).

    reporter.start(inspector, now)
    for each inspection: reporter.add(item, pipeline.counters.dropped, now)
    on each idle heartbeat: reporter.tick(pipeline.counters.dropped, now)
    at the end: reporter.finish(now)

For each inspected frame: the image features of the model-size image
(``image_features(item.fitted)``; none for an error frame), its verdict, P(defect) and
latency go into a ``WindowAccumulator``; the pipeline's dropped-frame counter goes in
as a delta. A due window (W frames or T seconds, also checked on idle heartbeats) is
closed on the line's thread (sums over at most W rows) and handed, with its seq, to the
reporter's own thread, which encodes it (``encode_window`` applies the privacy rules),
puts it in the spool (when there is a broker) and runs the local drift monitor, whose
result goes to the ``DriftAlarm``. So the fsyncs of the spool and of ``drift.json`` never
hold up the line (on an SD card one can take tens of milliseconds). A window under the
frame floor is not closed: its frames carry over.

The local drift check runs on windows of its own, ``check_frames`` long (default 100),
built from the same frames by a second accumulator; they never leave the device. An
alarm can only come at the end of a window, so short windows make the local alarm fast
(a defect rate going from 2% to 10% is seen within 250 frames; a 500-frame window could
not), while the published windows stay long enough to carry histograms.

Seqs are taken on the line's thread from a counter that starts at the spool's
``next_seq``. A window that is lost before the spool has it (the agent dies, the disk
refuses the write, the window is refused by the privacy check) leaves a gap, never a
repeat: a seq the spool never stored was never sent.

When the model changes (the first frame judged by a new inspector), the open window is
closed for the old model if it can be (at least MIN_WINDOW_FRAMES frames), else it is
discarded and logged: its frames cannot be merged into a window of another model, whose
histogram edges and reference differ. The monitor starts again for the new model.

``now`` is wall-clock seconds (window t0/t1 are unix seconds).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from edge_agent.core.drift import DriftConfig, DriftMonitor, DriftStatus
from edge_agent.core.features import image_features
from edge_agent.core.stats import WindowAccumulator, edges_of
from edge_agent.inspect import Inspector
from edge_agent.pipeline import Inspection
from edge_agent.protocol.telemetry import TelemetryWindow, encode_window
from edge_agent.telemetry.alarm import DriftAlarm
from edge_agent.telemetry.spool import Spool

log = logging.getLogger("edge_agent.telemetry")


class WindowMonitor(Protocol):
    """A drift monitor on one model's windows (``edge_agent.core.drift.DriftMonitor``)."""

    def update(self, window: TelemetryWindow) -> DriftStatus: ...


MonitorFactory = Callable[[Inspector], WindowMonitor | None]
Task = Callable[[], None]

# Windows waiting for the reporter's thread. Only a disk that hangs for minutes fills it;
# then windows are dropped (logged) rather than the line stalled.
QUEUE_WINDOWS = 64


def drift_monitor_for(inspector: Inspector) -> WindowMonitor | None:
    """The local monitor for a model: on its bundle's reference profile and the decision
    in force on this device; None for a bundle without a reference profile."""
    reference = inspector.manifest.reference
    if reference is None:
        return None
    return DriftMonitor(reference, inspector.decision, DriftConfig())


class TelemetryReporter:
    """Builds windows from inspections; see the module doc.

    Args:
        edge: the agent's version, sent in every window.
        window_frames, window_s: a window closes after this many frames or seconds.
        check_frames: length of the local drift check's own windows (>= 50).
        spool: where closed windows go to be sent; None without a broker (windows are
            then only checked locally).
        alarm: the local drift alarm.
        monitor_for: builds the drift monitor for a model (None: no local check).
        on_window: called (on the reporter's thread) after a window was spooled.
        on_model: called (on the line's thread) with the new model id when it changes.
    """

    def __init__(
        self,
        *,
        edge: str,
        window_frames: int,
        window_s: float,
        check_frames: int = 100,
        spool: Spool | None,
        alarm: DriftAlarm,
        monitor_for: MonitorFactory = drift_monitor_for,
        on_window: Callable[[], None] | None = None,
        on_model: Callable[[str], None] | None = None,
    ) -> None:
        self.edge = edge
        self.window_frames = window_frames
        self.window_s = window_s
        self.check_frames = check_frames
        self.spool = spool
        self.alarm = alarm
        self._monitor_for = monitor_for
        self._on_window = on_window
        self._on_model = on_model
        self._inspector: Inspector | None = None
        self._acc: WindowAccumulator | None = None
        self._check: WindowAccumulator | None = None
        self._check_seq = 0
        self._monitor: WindowMonitor | None = None
        self._model = ""
        self._dropped_seen: int | None = None
        self._next_seq = spool.next_seq if spool is not None else 0
        self._tasks: queue.Queue[Task | None] = queue.Queue(QUEUE_WINDOWS)
        self._thread: threading.Thread | None = None
        self.windows = 0  # windows closed since start
        self.frames_in_windows = 0  # inspected frames those windows cover
        self.discarded_frames = 0  # frames of partial windows lost at a model change

    def start(self, inspector: Inspector, now: float) -> None:
        """Begin windows for ``inspector``'s model; the first call starts the thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="telemetry-report")
            self._thread.daemon = True
            self._thread.start()
        self._inspector = inspector
        self._model = model = inspector.manifest.id
        self._acc = WindowAccumulator(
            edges_of(inspector.manifest.reference),
            max_frames=self.window_frames,
            max_seconds=self.window_s,
        )
        self._monitor = self._monitor_for(inspector)
        # Frames of an unfinished check window of the old model are simply let go: they
        # never leave the device, and the new model's monitor starts from zero.
        self._check = WindowAccumulator(
            edges_of(inspector.manifest.reference),
            max_frames=self.check_frames,
            max_seconds=self.window_s,
        )
        self._submit(lambda: self._start_alarm(model, now))
        if self._on_model is not None:
            self._on_model(model)

    def add(self, item: Inspection, dropped_total: int, now: float) -> None:
        """Count one inspection; close the window if it is due."""
        if item.inspector is not None and item.inspector is not self._inspector:
            self._switch(item.inspector, now)
        acc = self._accumulator()
        self._count_dropped(acc, dropped_total)
        v = item.verdict
        features = None
        if v.error is None and item.fitted is not None:
            features = image_features(item.fitted)
        acc.add(v.outcome.value, features, v.p_defect, v.latency_ms, now)
        if acc.due(now):
            self._close(now)
        check = self._check
        if check is not None:
            check.add(v.outcome.value, features, v.p_defect, v.latency_ms, now)
            if check.due(now):
                self._close_check(check, now)

    def tick(self, dropped_total: int, now: float) -> None:
        """On an idle heartbeat: count drops, close the window if its time is up."""
        acc = self._accumulator()
        self._count_dropped(acc, dropped_total)
        if acc.due(now):
            self._close(now)
        check = self._check
        if check is not None and check.due(now):
            self._close_check(check, now)

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until every window closed so far is spooled and
        checked; return whether that happened."""
        done = threading.Event()
        return self._submit(done.set) and done.wait(timeout_s)

    def finish(self, now: float, timeout_s: float = 10.0) -> None:
        """At stop: close what can be closed (a window under the floor is discarded),
        finish the queued work (up to ``timeout_s``) and end the thread."""
        acc = self._accumulator()
        if acc.frames and self._close(now) is None:
            self._discard(acc.frames, "agent stopped")
        if self._thread is not None:
            try:
                self._tasks.put(None, timeout=timeout_s)
            except queue.Full:
                return
            self._thread.join(timeout_s)

    def _accumulator(self) -> WindowAccumulator:
        if self._acc is None:
            raise RuntimeError("TelemetryReporter.start() was not called")
        return self._acc

    def _count_dropped(self, acc: WindowAccumulator, dropped_total: int) -> None:
        if self._dropped_seen is not None and dropped_total > self._dropped_seen:
            acc.add_dropped(dropped_total - self._dropped_seen)
            if self._check is not None:
                self._check.add_dropped(dropped_total - self._dropped_seen)
        self._dropped_seen = dropped_total

    def _switch(self, inspector: Inspector, now: float) -> None:
        acc = self._accumulator()
        if acc.frames and self._close(now) is None:
            self._discard(acc.frames, f"model changed to {inspector.manifest.id}")
        self.start(inspector, now)

    def _discard(self, frames: int, reason: str) -> None:
        self.discarded_frames += frames
        log.info(
            "partial telemetry window discarded",
            extra={
                "event": "window_discarded",
                "frames": frames,
                "reason": reason,
                "model": self._model,
            },
        )

    def _close(self, now: float) -> TelemetryWindow | None:
        acc = self._accumulator()
        window = acc.close(now, seq=self._next_seq, model=self._model, edge=self.edge)
        if window is None:
            return None  # under the floor: the frames carry over into the next window
        self._next_seq += 1
        self.windows += 1
        self.frames_in_windows += window.frames
        if not self._submit(lambda: self._send(window)):
            log.error(
                "telemetry window dropped: the reporter is behind",
                extra={"event": "window_dropped", "seq": window.seq},
            )
        return window

    def _close_check(self, check: WindowAccumulator, now: float) -> None:
        window = check.close(now, seq=self._check_seq, model=self._model, edge=self.edge)
        monitor = self._monitor
        if window is None or monitor is None:
            return
        self._check_seq += 1
        self._submit(lambda: self._check_window(window, monitor, now))

    def _submit(self, task: Task) -> bool:
        try:
            self._tasks.put_nowait(task)
        except queue.Full:
            return False
        return True

    # -- the reporter's thread ------------------------------------------------------------

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            task()

    def _start_alarm(self, model: str, now: float) -> None:
        try:
            self.alarm.start(model, now)
        except OSError as e:
            _log_write_error(self.alarm.path.name, e)

    def _check_window(self, window: TelemetryWindow, monitor: WindowMonitor, now: float) -> None:
        status = monitor.update(window)
        try:
            self.alarm.observe(status, now)
        except OSError as e:
            _log_write_error(self.alarm.path.name, e)

    def _send(self, window: TelemetryWindow) -> None:
        try:
            payload = encode_window(window)
        except ValueError as e:  # PrivacyError included: the window must not leave
            log.error(
                "telemetry window refused",
                extra={"event": "window_refused", "seq": window.seq, "error": str(e)},
            )
            return
        if self.spool is None:
            return
        try:
            self.spool.append(window.seq, payload)
        except OSError as e:
            _log_write_error("telemetry spool", e)
            return
        if self._on_window is not None:
            self._on_window()


def _log_write_error(what: str, error: OSError) -> None:
    # The line keeps running; telemetry is what suffers.
    log.error(
        "telemetry write failed",
        extra={"event": "telemetry_write_failed", "file": what, "error": str(error)},
    )
