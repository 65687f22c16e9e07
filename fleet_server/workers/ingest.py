"""Telemetry ingest: every device's windows and state messages into the database.

Subscribes (on the server's ``MqttTransport``) to ``topics.device_filter("telemetry")``
and ``topics.device_filter("state")``. The network thread only queues messages; one
worker thread decodes, stores and hands windows on, so a slow database or detector
never stalls the MQTT connection (and windows of one device stay in order):

- a payload that does not decode (``decode_window`` / ``decode_state``: not JSON, wrong
  schema, a broken privacy rule) is counted as rejected and logged with the device id
  and the reason; ingest goes on;
- a window whose (device, seq) is stored already is a duplicate: counted, ignored, never
  counted twice;
- stored windows go to ``on_window`` in each device's seq order (``SeqOrderer``: a gap
  is waited for ``reorder_wait_s``, a late window is stored but not fed).

Counters are logged every ``status_interval_s`` when they changed.
"""

from __future__ import annotations

import json
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
from edge_agent.protocol.telemetry import TelemetryWindow, decode_window
from edge_agent.transport import MqttTransport
from fleet_server.domain.sequencing import SeqOrderer
from fleet_server.storage import StorageError, TelemetryStore

DEFAULT_REORDER_WAIT_S = 5.0
DEFAULT_STATUS_INTERVAL_S = 60.0
QUEUE_SIZE = 100_000
_POLL_S = 0.1

WindowHandler = Callable[[str, TelemetryWindow, datetime], None]
StateHandler = Callable[[str, DeviceState], None]


@dataclass(slots=True)
class IngestCounters:
    windows: int = 0  # stored
    duplicates: int = 0  # (device, seq) seen before: ignored
    rejected: int = 0  # payloads that did not decode
    states: int = 0
    late: int = 0  # stored, but older than a window already fed to the detectors
    overflow: int = 0  # dropped because the queue was full
    errors: int = 0  # database or detector failures


@dataclass(frozen=True, slots=True)
class _Message:
    kind: str  # "telemetry" or "state"
    device_id: str
    payload: bytes
    received: datetime


class TelemetryIngest:
    """Ingest worker. ``start`` subscribes and starts the worker thread; ``stop`` ends it.

    Args:
        transport: the server's transport (started or not).
        telemetry: where devices and windows are stored.
        on_window: gets each stored window in the device's seq order (the drift monitor).
        on_state: gets each decoded state message.
        clock: the current time, aware (received_at).
        reorder_wait_s: how long a gap in a device's seqs is waited for.
    """

    def __init__(
        self,
        transport: MqttTransport,
        telemetry: TelemetryStore,
        *,
        on_window: WindowHandler | None = None,
        on_state: StateHandler | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        reorder_wait_s: float = DEFAULT_REORDER_WAIT_S,
        status_interval_s: float = DEFAULT_STATUS_INTERVAL_S,
        logger: logging.Logger | None = None,
    ) -> None:
        self._transport = transport
        self._telemetry = telemetry
        self._on_window = on_window
        self._on_state = on_state
        self._clock = clock
        self._orderer: SeqOrderer[TelemetryWindow] = SeqOrderer(reorder_wait_s)
        self._status_interval_s = status_interval_s
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self._queue: queue.Queue[_Message] = queue.Queue(QUEUE_SIZE)
        self._counters = IngestCounters()
        self._last_logged: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)

    def prime(self, last_seq: dict[str, int]) -> None:
        """The last seq already fed per device (from ``FleetDriftMonitor.rebuild``).
        Call before ``start``."""
        for device_id, seq in last_seq.items():
            self._orderer.prime(device_id, seq)

    def start(self) -> None:
        self._thread.start()
        self._transport.subscribe(topics.device_filter("telemetry"), self._receive, qos=1)
        self._transport.subscribe(topics.device_filter("state"), self._receive, qos=1)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Process what is queued (up to ``timeout_s``), then end the worker thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._log_status(force=True)

    def counters(self) -> IngestCounters:
        """A copy of the counters."""
        with self._lock:
            return IngestCounters(**asdict(self._counters))

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until the queue is empty and nothing is being processed (tests)."""
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
            try:
                message = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    break
                message = None
            if message is not None:
                try:
                    self._handle(message)
                finally:
                    self._queue.task_done()
            for device_id, window in self._orderer.due(time.monotonic()):
                self._feed(device_id, window, self._clock())
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + self._status_interval_s
                self._log_status()

    def _handle(self, message: _Message) -> None:
        if message.kind == "state":
            self._handle_state(message)
        else:
            self._handle_window(message)

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

    def _handle_window(self, message: _Message) -> None:
        device_id = message.device_id
        try:
            window = decode_window(message.payload)
            document = json.loads(message.payload)
        except ValueError as e:
            self._reject(message, e)
            return
        try:
            stored = self._telemetry.add_window(device_id, window, document, message.received)
        except StorageError as e:
            self._count("errors")
            self._logger.error("window %d of %s not stored: %s", window.seq, device_id, e)
            return
        if not stored:
            self._count("duplicates")
            self._logger.debug("duplicate window %d of %s ignored", window.seq, device_id)
            return
        self._count("windows")
        ready = self._orderer.offer(device_id, window.seq, window, time.monotonic())
        if ready is None:
            self._count("late")
            self._logger.info(
                "window %d of %s arrived after a later one: stored, not monitored",
                window.seq,
                device_id,
            )
            return
        for item in ready:
            self._feed(device_id, item, message.received)

    def _feed(self, device_id: str, window: TelemetryWindow, received: datetime) -> None:
        if self._on_window is None:
            return
        try:
            self._on_window(device_id, window, received)
        except (StorageError, ValueError) as e:
            # Stored already; the next window is monitored as usual.
            self._count("errors")
            self._logger.error(
                "drift monitoring of window %d of %s failed: %s", window.seq, device_id, e
            )

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
        with self._lock:
            setattr(self._counters, name, getattr(self._counters, name) + 1)

    def _log_status(self, *, force: bool = False) -> None:
        counters = asdict(self.counters())
        if force or counters != self._last_logged:
            self._last_logged = counters
            self._logger.info(
                "ingest: %s; waiting for gaps: %d",
                ", ".join(f"{k}={v}" for k, v in counters.items()),
                self._orderer.waiting(),
            )
