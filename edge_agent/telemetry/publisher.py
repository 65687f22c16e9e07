"""Sends spooled windows over MQTT, in seq order, and deletes each only after its PUBACK.

One thread. While connected it hands the oldest unsent windows to the transport (QoS 1,
at most ``max_in_flight`` awaiting a PUBACK) and removes each from the spool once the
broker has acknowledged it. A window handed over is never handed over again by this
process: if the connection drops first, paho keeps it in its outgoing queue and resends it
(flagged DUP) after the reconnect, and this thread keeps waiting on the same delivery.
So a window reaches the server twice only through that QoS 1 redelivery, or after the
agent restarts with windows it had sent but not yet seen acknowledged; the server
drops a repeated seq.

While disconnected the thread waits; windows accumulate in the spool (bounded there).
Every payload is checked with ``decode_window`` (the same schema and privacy check the
server applies) just before it is handed over; one that fails is discarded and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from edge_agent.protocol.telemetry import decode_window
from edge_agent.telemetry.spool import Spool
from edge_agent.transport import Delivery

log = logging.getLogger("edge_agent.telemetry")

_IDLE_S = 0.5
_ACK_POLL_S = 0.2


class ConfirmingLink(Protocol):
    """What the publisher needs from ``MqttTransport``."""

    @property
    def connected(self) -> bool: ...

    def publish_tracked(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> Delivery | None: ...


class WindowPublisher:
    """Drains ``spool`` to ``topic`` over ``link`` on its own thread.

    Args:
        spool: the window spool.
        link: the MQTT transport.
        topic: ``topics.telemetry(device_id)``.
        max_in_flight: windows handed to the transport and not yet acknowledged.
        on_drained: called (on this thread) when the backlog has just been sent after
            having been more than one window, e.g. to refresh the retained state's counts.
    """

    def __init__(
        self,
        spool: Spool,
        link: ConfirmingLink,
        topic: str,
        *,
        max_in_flight: int = 8,
        on_drained: Callable[[], None] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.spool = spool
        self._link = link
        self._topic = topic
        self._max_in_flight = max_in_flight
        self._on_drained = on_drained
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._drain_until = 0.0
        self._thread: threading.Thread | None = None
        self._in_flight: deque[tuple[int, Delivery]] = deque()
        self._handed: int | None = None  # highest seq handed to the transport
        self._backlog = False
        self.sent = 0  # windows acknowledged since start

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A window was appended: send it now rather than at the next poll."""
        self._wake.set()

    def stop(self, drain_s: float = 2.0) -> None:
        """Send what is spooled for up to ``drain_s`` more seconds (if connected), then
        stop. Windows not acknowledged by then stay spooled for the next start."""
        self._drain_until = time.monotonic() + drain_s
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=drain_s + 5.0)

    def _loop(self) -> None:
        while True:
            self._collect_acks()
            if self._stopping.is_set():
                # Draining: send what is spooled while connected, until the deadline.
                if time.monotonic() >= self._drain_until or not self._link.connected:
                    return
                if not self._in_flight and self.spool.first_after(self._handed) is None:
                    return
            if self._link.connected:
                self._hand_over()
            if self._in_flight:
                self._in_flight[0][1].wait(_ACK_POLL_S)
            else:
                self._wake.wait(_IDLE_S)
                self._wake.clear()

    def _collect_acks(self) -> None:
        while self._in_flight and self._in_flight[0][1].done:
            seq, _ = self._in_flight.popleft()
            self.spool.remove(seq)
            self.sent += 1
        if self._backlog and not self._in_flight and self.spool.first_after(self._handed) is None:
            self._backlog = False
            log.info(
                "telemetry backlog sent",
                extra={"event": "telemetry_backlog_sent", "sent": self.sent},
            )
            if self._on_drained is not None:
                self._on_drained()

    def _hand_over(self) -> None:
        while len(self._in_flight) < self._max_in_flight:
            seq = self.spool.first_after(self._handed)
            if seq is None:
                return
            if self.spool.first_after(seq) is not None:
                self._backlog = True
            try:
                payload = self.spool.read(seq)
            except OSError as e:
                self.spool.discard(seq, f"unreadable: {e}")
                self._handed = seq
                continue
            if payload is None:  # dropped from a full spool meanwhile
                self._handed = seq
                continue
            try:
                window = decode_window(payload)
            except ValueError as e:
                self.spool.discard(seq, f"fails the wire check: {e}")
                self._handed = seq
                continue
            if window.seq != seq:
                self.spool.discard(seq, f"file of seq {seq} holds seq {window.seq}")
                self._handed = seq
                continue
            delivery = self._link.publish_tracked(self._topic, payload)
            if delivery is None:
                return  # disconnected, or the transport's queue is full: try again later
            self._in_flight.append((seq, delivery))
            self._handed = seq
