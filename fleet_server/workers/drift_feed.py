"""The drift feed: stored windows into the drift monitor, read back from the database.

Ingest stores windows as fast as they come; the detectors and the alert decisions cost
far more per window (deciding looks at the whole fleet). So they run apart: this feed
tails ``telemetry_windows`` in row-id order (``TelemetryStore.windows_after``) on its own
thread and hands each device's windows to ``FleetDriftMonitor`` in seq order
(``SeqOrderer``: a gap is waited for ``reorder_wait_s``; a late window was stored but is
not fed). Reading from the database, not from ingest's memory, is what keeps drift
right when several ingest processes split the telemetry on a shared subscription: each
stores its share, one feed sees them all (docs/adr/0013-shared-ingest.md).

The backlog is bounded: at most ``batch`` windows are read and held at a time; the rest
wait in the database, never dropped. Storing comes first: while ``yield_to()`` says
ingest has a backlog of its own, the feed reads nothing (the process has one GIL; a
burst is stored at full speed and monitored right after). While the feed keeps up (at
most ``coalesce_after`` windows ready at once) alerts are decided after every window,
exactly as a window arrives; behind that, a whole batch is fed and decided once.
``lag()`` says how far behind it is; the status line logs it.

State messages (a device's line and profile) reach the monitor through ``on_state`` on
the same thread, so the monitor is only ever used from here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from edge_agent.protocol.state import DeviceState
from fleet_server.domain.sequencing import SeqOrderer
from fleet_server.storage import StorageError, TelemetryStore
from fleet_server.storage.telemetry_store import TailedWindow
from fleet_server.workers.drift_monitor import FleetDriftMonitor

DEFAULT_FEED_BATCH = 500
DEFAULT_COALESCE_AFTER = 32
DEFAULT_POLL_S = 0.2
DEFAULT_STATUS_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class DriftLag:
    """How far the feed is behind ingest.

    ``windows``: stored, not read yet. ``waiting``: read, held back behind a gap.
    ``seconds``: age (by ``received_at``) of the last window fed; 0 when caught up.
    """

    windows: int
    waiting: int
    seconds: float


@dataclass(slots=True)
class FeedCounters:
    fed: int = 0  # handed to the monitor
    late: int = 0  # below a seq already fed: stored, not monitored
    coalesced: int = 0  # batches decided once (the feed was behind)
    errors: int = 0  # database or detector failures


class DriftFeed:
    """Tails stored windows into ``monitor``. ``start`` rebuilds and starts the thread.

    Args:
        telemetry: the store ingest writes to.
        monitor: the drift monitor (used only from this feed's thread once started).
        reorder_wait_s: how long a gap in a device's seqs is waited for.
        batch: windows read per query (the bound of the backlog held in memory).
        coalesce_after: more windows than this ready at once are decided once.
        poll_s: pause between reads when there is nothing new.
        clock: the current time, aware (the lag's age).
        yield_to: True while something more urgent in the process is behind (ingest's
            queue); the feed then waits.

    Raises:
        ValueError: a batch or coalesce_after below 1, a negative wait or poll.
    """

    def __init__(
        self,
        telemetry: TelemetryStore,
        monitor: FleetDriftMonitor,
        *,
        reorder_wait_s: float,
        batch: int = DEFAULT_FEED_BATCH,
        coalesce_after: int = DEFAULT_COALESCE_AFTER,
        poll_s: float = DEFAULT_POLL_S,
        status_interval_s: float = DEFAULT_STATUS_INTERVAL_S,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        yield_to: Callable[[], bool] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if batch < 1 or coalesce_after < 1 or poll_s < 0:
            raise ValueError("need batch >= 1, coalesce_after >= 1 and poll_s >= 0")
        self._telemetry = telemetry
        self._monitor = monitor
        self._orderer: SeqOrderer[TailedWindow] = SeqOrderer(reorder_wait_s)
        self._batch = batch
        self._coalesce_after = coalesce_after
        self._poll_s = poll_s
        self._status_interval_s = status_interval_s
        self._last_logged: tuple[FeedCounters, DriftLag] | None = None
        self._clock = clock
        self._yield_to = yield_to
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self._states: queue.SimpleQueue[tuple[str, DeviceState]] = queue.SimpleQueue()
        self._counters = FeedCounters()
        self._lock = threading.Lock()
        self._cursor = 0
        self._last_fed: datetime | None = None
        self._busy = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drift-feed", daemon=True)

    def start(self, replay: int) -> None:
        """Replay the last ``replay`` stored windows of every device into the detectors,
        then tail what is stored from now on.

        Raises:
            StorageError: the database cannot be read.
        """
        # The cursor first: a window stored during the replay is then read again and
        # found late (its seq fed already), never missed.
        self._cursor = self._telemetry.last_window_id()
        for device_id, seq in self._monitor.rebuild(replay).items():
            self._orderer.prime(device_id, seq)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the thread (after the batch in hand)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._log_status(force=True)

    def on_state(self, device_id: str, state: DeviceState) -> None:
        """Queue a decoded state message for the monitor (any thread)."""
        self._states.put((device_id, state))

    def counters(self) -> FeedCounters:
        with self._lock:
            return FeedCounters(**{k: getattr(self._counters, k) for k in FeedCounters.__slots__})

    def lag(self) -> DriftLag:
        """How far behind the feed is (one small query).

        Raises:
            StorageError: the database cannot be read.
        """
        behind = max(0, self._telemetry.last_window_id() - self._cursor)
        last = self._last_fed
        seconds = 0.0
        if behind and last is not None:
            seconds = max(0.0, (self._clock() - last).total_seconds())
        return DriftLag(behind, self._orderer.waiting(), seconds)

    def wait_caught_up(self, timeout_s: float) -> bool:
        """Block until every stored window has been read and fed (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._busy and self._states.empty():
                lag = self.lag()
                if lag.windows == 0 and lag.waiting == 0 and not self._busy:
                    return True
            time.sleep(0.02)
        return False

    def _run(self) -> None:
        next_status = time.monotonic() + self._status_interval_s
        while not self._stop.is_set():
            self._busy = True
            try:
                read = self._step()
            except Exception:
                # A bug in one batch must not end drift monitoring for good: log it with
                # its traceback, count it, and go on after a pause (the batch is skipped).
                self._count("errors")
                self._logger.exception("drift feed failed on a batch of windows")
                read = False
            finally:
                self._busy = False
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + self._status_interval_s
                self._log_status()
            if not read:
                self._stop.wait(self._poll_s)

    def _log_status(self, *, force: bool = False) -> None:
        counters = self.counters()
        try:
            lag = self.lag()
        except StorageError as e:
            self._logger.error("drift feed cannot read its lag: %s", e)
            return
        if force or (counters, lag) != self._last_logged:
            self._last_logged = (counters, lag)
            self._logger.info(
                "drift: fed=%d, late=%d, coalesced=%d, errors=%d; behind: %d windows "
                "(%.1f s), %d held for gaps",
                counters.fed,
                counters.late,
                counters.coalesced,
                counters.errors,
                lag.windows,
                lag.seconds,
                lag.waiting,
            )

    def _step(self) -> bool:
        """Read and feed one batch; whether anything new was read."""
        while not self._states.empty():
            self._monitor.on_state(*self._states.get())
        if self._yield_to is not None and self._yield_to():
            return False
        try:
            rows, self._cursor = self._telemetry.windows_after(self._cursor, self._batch)
        except StorageError as e:
            self._count("errors")
            self._logger.error("drift feed cannot read new windows: %s", e)
            return False
        now = time.monotonic()
        ready: list[TailedWindow] = []
        for row in rows:
            released = self._orderer.offer(row.device_id, row.window.seq, row, now)
            if released is None:
                self._count("late")
                self._logger.info(
                    "window %d of %s arrived after a later one: stored, not monitored",
                    row.window.seq,
                    row.device_id,
                )
            else:
                ready += released
        ready += [item for _, item in self._orderer.due(now)]
        if ready:
            self._feed(ready)
        return bool(rows)

    def _feed(self, ready: list[TailedWindow]) -> None:
        if len(ready) <= self._coalesce_after:
            for row in ready:
                try:
                    self._monitor.on_window(row.device_id, row.window, row.received_at)
                except (StorageError, ValueError) as e:
                    # Stored already; the next window is monitored as usual.
                    self._count("errors")
                    self._logger.error(
                        "drift monitoring of window %d of %s failed: %s",
                        row.window.seq,
                        row.device_id,
                        e,
                    )
        else:
            try:
                self._monitor.on_windows([(r.device_id, r.window, r.received_at) for r in ready])
            except (StorageError, ValueError) as e:
                self._count("errors")
                self._logger.error("drift monitoring of %d windows failed: %s", len(ready), e)
            self._count("coalesced")
        with self._lock:
            self._counters.fed += len(ready)
        self._last_fed = ready[-1].received_at

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self._counters, name, getattr(self._counters, name) + 1)
