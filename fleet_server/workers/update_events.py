"""Update-event ingest: the devices' ``devices/{id}/events`` into the rollouts.

``handle(topic, payload)`` is the MQTT handler for ``topics.device_filter("events")``.
On the network thread it only parses the topic (``topics.parse``) and the payload
(``decode_event``) and queues the event, so a wave of a thousand devices reporting at
once never stalls the server's MQTT connection (which also serves update chunks). A
worker thread, started with the first event, stores the queued events in batches (one
transaction each, in arrival order) through ``RolloutService.record_events``, which moves
the devices' rollout status.

Nothing here raises: a message on a foreign topic or a payload that does not decode is
counted as rejected and logged with the device id and the reason; a full queue drops
the event (counted); a database failure is counted and logged, and the next batch is
stored as usual.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Final

from edge_agent.protocol import topics
from edge_agent.protocol.events import decode_event
from fleet_server.rollouts import ReceivedEvent, RolloutService
from fleet_server.storage import StorageError

QUEUE_SIZE: Final = 100_000
BATCH: Final = 500
_POLL_S: Final = 0.1


@dataclass(slots=True)
class EventCounters:
    events: int = 0  # stored
    rejected: int = 0  # not an events topic, or a payload that did not decode
    overflow: int = 0  # dropped because the queue was full
    errors: int = 0  # events lost to database failures


class UpdateEventIngest:
    """Feeds decoded update events to ``service``.

    Args:
        service: the rollouts the events belong to.
        clock: the current time, aware UTC (the events' ``received_at``).
        logger: one line per rejected message or failure.
    """

    def __init__(
        self,
        service: RolloutService,
        clock: Callable[[], datetime],
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        self._service = service
        self._clock = clock
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self._counters = EventCounters()
        self._lock = threading.Lock()
        self._queue: queue.Queue[ReceivedEvent] = queue.Queue(QUEUE_SIZE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def counters(self) -> EventCounters:
        """A copy of the counters so far."""
        with self._lock:
            return EventCounters(**asdict(self._counters))

    def handle(self, topic: str, payload: bytes) -> None:
        """Queue one event message for storing; never raises (see the module doc)."""
        parsed = topics.parse(topic)
        if parsed is None or parsed[1] != "events":
            self._count("rejected")
            self._logger.warning("update event on unexpected topic %r ignored", topic)
            return
        device_id = parsed[0]
        try:
            event = decode_event(payload)
        except ValueError as e:
            self._count("rejected")
            self._logger.warning("malformed update event from %s rejected: %s", device_id, e)
            return
        self._ensure_worker()
        try:
            self._queue.put_nowait(ReceivedEvent(device_id, event, self._clock()))
        except queue.Full:
            self._count("overflow")
            self._logger.error("update event queue full: %s of %s dropped", event.event, device_id)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Store what is queued (up to ``timeout_s``), then end the worker (idempotent)."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout_s)

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="update-events", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._store(batch)

    def _store(self, batch: list[ReceivedEvent]) -> None:
        try:
            self._service.record_events(batch)
        except StorageError as e:
            self._count("errors", len(batch))
            self._logger.error("%d update event(s) not stored: %s", len(batch), e)
        else:
            self._count("events", len(batch))

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._counters, name, getattr(self._counters, name) + n)
