"""Telemetry ingest: every device's windows and state messages into the database.

Subscribes (on the server's ``MqttTransport``) to ``topics.device_filter("telemetry")``
and ``topics.device_filter("state")``. With ``share``, telemetry is a shared
subscription (``$share/<group>/...``): the broker gives each window to one of the
group's ingest processes, so several processes split the load. State messages stay a
plain subscription: they are few, retained (a broker sends no retained messages on a
shared subscription), and every process may record them.

The network thread only queues messages; one storage thread takes them in batches (up
to ``batch_size``, waiting at most ``batch_wait_s`` for a batch to fill) and stores each
batch's windows in one transaction (``TelemetryStore.add_windows``), so the database
costs one commit per batch, not per window:

- a payload that does not decode (``decode_window`` / ``decode_state``: not JSON, wrong
  schema, a broken privacy rule) is counted as rejected and logged with the device id
  and the reason; ingest goes on;
- a window whose (device, seq) is stored already, by this process or another one, is a
  duplicate: counted, ignored, never counted twice;
- messages are handled in arrival order: a state message between windows is recorded
  after the windows before it.

Drift monitoring reads the stored windows back (``drift_feed.DriftFeed``), so it never
slows storing down. Other handlers (the devices' update events, the chunk server) are
separate ``transport.subscribe`` calls on the same transport: one connection, one
network thread, each handler queueing its own work.

Counters are logged every ``status_interval_s`` when they changed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from edge_agent.protocol import topics
from edge_agent.protocol.state import DeviceState, decode_state
from edge_agent.protocol.telemetry import decode_window
from edge_agent.transport import MqttTransport
from fleet_server.storage import StorageError, TelemetryStore
from fleet_server.storage.telemetry_store import IncomingWindow

DEFAULT_BATCH_SIZE = 500
DEFAULT_BATCH_WAIT_S = 0.05
DEFAULT_STATUS_INTERVAL_S = 60.0
DEFAULT_SHARE_GROUP = "fleet"
QUEUE_SIZE = 100_000
STORE_ATTEMPTS = 3
_RETRY_S = 0.5
_POLL_S = 0.1

StateHandler = Callable[[str, DeviceState], None]


@dataclass(slots=True)
class IngestCounters:
    windows: int = 0  # stored
    duplicates: int = 0  # (device, seq) stored before: ignored
    rejected: int = 0  # payloads that did not decode
    states: int = 0
    overflow: int = 0  # dropped because the queue was full
    errors: int = 0  # windows or states the database did not take
    batches: int = 0  # transactions that stored windows


@dataclass(frozen=True, slots=True)
class _Message:
    kind: str  # "telemetry" or "state"
    device_id: str
    payload: bytes
    received: datetime


class TelemetryIngest:
    """Ingest worker. ``start`` subscribes and starts the storage thread; ``stop`` ends it.

    Args:
        transport: the server's transport (started or not).
        telemetry: where devices and windows are stored.
        on_state: gets each decoded and recorded state message (on the storage thread).
        share: shared subscription group for telemetry; None for a plain subscription.
        batch_size: most windows stored in one transaction.
        batch_wait_s: how long a started batch waits for more messages.
        clock: the current time, aware (received_at).

    Raises:
        ValueError: a batch size below 1 or a negative wait; an invalid ``share``.
    """

    def __init__(
        self,
        transport: MqttTransport,
        telemetry: TelemetryStore,
        *,
        on_state: StateHandler | None = None,
        share: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        status_interval_s: float = DEFAULT_STATUS_INTERVAL_S,
        logger: logging.Logger | None = None,
    ) -> None:
        if batch_size < 1 or batch_wait_s < 0:
            raise ValueError(f"need batch_size >= 1 and batch_wait_s >= 0, got {batch_size}")
        if share is not None and (not share or any(c in share for c in "/+#")):
            raise ValueError(f"invalid shared subscription group: {share!r}")
        self._transport = transport
        self._telemetry = telemetry
        self._on_state = on_state
        self._share = share
        self._batch_size = batch_size
        self._batch_wait_s = batch_wait_s
        self._clock = clock
        self._status_interval_s = status_interval_s
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self._queue: queue.Queue[_Message] = queue.Queue(QUEUE_SIZE)
        self._counters = IngestCounters()
        self._last_logged: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)

    def start(self) -> None:
        self._thread.start()
        telemetry = topics.device_filter("telemetry")
        if self._share is None:
            self._transport.subscribe(telemetry, self._receive, qos=1)
        else:
            self._transport.subscribe_shared(self._share, telemetry, self._receive, qos=1)
        self._transport.subscribe(topics.device_filter("state"), self._receive, qos=1)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Store what is queued (up to ``timeout_s``), then end the storage thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._log_status(force=True)

    def counters(self) -> IngestCounters:
        """A copy of the counters."""
        with self._lock:
            return IngestCounters(**asdict(self._counters))

    def backlog(self) -> int:
        """Messages received and not handled yet."""
        return self._queue.unfinished_tasks

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until the queue is empty and nothing is being stored (tests)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return self._queue.unfinished_tasks == 0

    def _receive(self, topic: str, payload: bytes) -> None:
        # On the network thread: queue and return.
        parsed = topics.parse(topic)
        if parsed is None:
            return
        device_id, kind = parsed
        if kind not in ("telemetry", "state"):
            return
        try:
            self._queue.put_nowait(_Message(kind, device_id, payload, self._clock()))
        except queue.Full:
            self._count("overflow")
            self._logger.warning("ingest queue full: %s %s dropped", device_id, kind)

    def _run(self) -> None:
        next_status = time.monotonic() + self._status_interval_s
        while True:
            batch = self._take_batch()
            if batch:
                try:
                    self._handle(batch)
                finally:
                    for _ in batch:
                        self._queue.task_done()
            elif self._stop.is_set():
                break
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + self._status_interval_s
                self._log_status()

    def _take_batch(self) -> list[_Message]:
        """The next messages: the first waited for up to _POLL_S, the rest up to
        ``batch_wait_s`` after it (at once when stopping)."""
        try:
            batch = [self._queue.get(timeout=_POLL_S)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self._batch_wait_s
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set():
                break
            try:
                batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _handle(self, batch: list[_Message]) -> None:
        windows: list[IncomingWindow] = []
        for message in batch:
            if message.kind == "state":
                # Windows that came before the state message are stored before it.
                self._store(windows)
                windows = []
                self._handle_state(message)
                continue
            try:
                window = decode_window(message.payload)
                # decode_window accepted it: UTF-8 JSON, stored as received.
                document = message.payload.decode()
            except ValueError as e:
                self._reject(message, e)
                continue
            windows.append(IncomingWindow(message.device_id, window, document, message.received))
        self._store(windows)

    def _store(self, windows: list[IncomingWindow]) -> None:
        if not windows:
            return
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                result = self._telemetry.add_windows(windows)
                break
            except StorageError as e:
                if attempt == STORE_ATTEMPTS or self._stop.is_set():
                    self._add("errors", len(windows))
                    self._logger.error("%d windows not stored: %s", len(windows), e)
                    return
                # A busy database (another process writing) clears up in a moment.
                self._logger.warning("storing %d windows failed, retrying: %s", len(windows), e)
                self._stop.wait(_RETRY_S * attempt)
        with self._lock:
            self._counters.windows += len(result.stored)
            self._counters.duplicates += result.duplicates
            self._counters.batches += 1
        if result.duplicates:
            self._logger.debug("%d duplicate windows ignored", result.duplicates)

    def _handle_state(self, message: _Message) -> None:
        try:
            state = decode_state(message.payload)
        except ValueError as e:
            self._reject(message, e)
            return
        try:
            self._telemetry.record_state(message.device_id, state, message.received)
        except StorageError as e:
            self._count("errors")
            self._logger.error("state of %s not stored: %s", message.device_id, e)
            return
        self._count("states")
        if self._on_state is not None:
            self._on_state(message.device_id, state)

    def _reject(self, message: _Message, error: ValueError) -> None:
        self._count("rejected")
        self._logger.warning(
            "rejected %s message from %s (%d bytes): %s",
            message.kind,
            message.device_id,
            len(message.payload),
            error,
        )

    def _count(self, name: str) -> None:
        self._add(name, 1)

    def _add(self, name: str, n: int) -> None:
        with self._lock:
            setattr(self._counters, name, getattr(self._counters, name) + n)

    def _log_status(self, *, force: bool = False) -> None:
        counters = asdict(self.counters())
        if force or counters != self._last_logged:
            self._last_logged = counters
            self._logger.info("ingest: %s", ", ".join(f"{k}={v}" for k, v in counters.items()))
