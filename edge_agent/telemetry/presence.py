"""The retained device state on ``devices/{id}/state``.

Published (retained, QoS 1) on every connect, from the transport's connect hook, and
whenever the model or the drift flags change or the telemetry backlog has been sent,
at most once per ``min_interval_s`` (a change inside the interval goes out when it
ends). The transport's last will, set at connect, is ``encode_state(OFFLINE)`` on the
same topic, so the broker marks the device offline when it vanishes; on a clean stop
the agent publishes OFFLINE itself (a clean DISCONNECT suppresses the will).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from edge_agent.protocol import topics
from edge_agent.protocol.state import OFFLINE, DeviceState, Status, encode_state
from edge_agent.telemetry.spool import SpoolCounts
from edge_agent.transport import Delivery

log = logging.getLogger("edge_agent.telemetry")


class StateLink(Protocol):
    """What the state publisher needs from ``MqttTransport``."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool: ...

    def publish_tracked(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> Delivery | None: ...


def will_of(device_id: str) -> tuple[str, bytes, bool]:
    """The last will for the device's transport: OFFLINE, retained, on its state topic."""
    return topics.state(device_id), encode_state(OFFLINE), True


class StatePublisher:
    """Keeps the device's retained state current.

    Args:
        link: the MQTT transport.
        device_id, edge, profile, line: fixed facts about the device.
        spool_counts: current spool counts (None without a spool).
        min_interval_s: least time between two state messages, except on connect.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        link: StateLink,
        device_id: str,
        *,
        edge: str,
        profile: str,
        line: str | None,
        spool_counts: Callable[[], SpoolCounts | None],
        min_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._link = link
        self._topic = topics.state(device_id)
        self._edge, self._profile, self._line = edge, profile, line
        self._spool_counts = spool_counts
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._model: str | None = None
        self._drift: tuple[str, ...] = ()
        self._dirty = False
        self._last = -float("inf")
        self.published = 0

    def set_model(self, model: str) -> None:
        with self._lock:
            if model != self._model:
                self._model, self._dirty = model, True

    def set_drift(self, flags: tuple[str, ...]) -> None:
        with self._lock:
            if flags != self._drift:
                self._drift, self._dirty = flags, True

    def refresh(self) -> None:
        """Send the counts again at the next ``tick`` (e.g. the backlog was sent)."""
        with self._lock:
            self._dirty = True

    def on_connect(self) -> None:
        """The transport's connect hook: publish now, whatever the interval."""
        self._publish()

    def tick(self) -> None:
        """Publish a pending change if the interval allows (the agent's loop calls this)."""
        with self._lock:
            due = self._dirty and self._clock() - self._last >= self._min_interval_s
        if due:
            self._publish()

    def publish_offline(self, timeout_s: float) -> bool:
        """Publish OFFLINE (retained) and wait up to ``timeout_s`` for the PUBACK; for a
        clean stop, before the transport disconnects."""
        delivery = self._link.publish_tracked(self._topic, encode_state(OFFLINE), retain=True)
        return delivery is not None and delivery.wait(timeout_s)

    def current(self) -> DeviceState:
        counts = self._spool_counts()
        with self._lock:
            model, drift = self._model, self._drift
        return DeviceState(
            status=Status.ONLINE,
            ts=int(time.time()),
            model=model,
            edge=self._edge,
            profile=self._profile,
            line=self._line,
            drift=drift,
            spool_queued=None if counts is None else counts.queued,
            spool_dropped=None if counts is None else counts.dropped,
        )

    def _publish(self) -> None:
        try:
            payload = encode_state(self.current())
        except ValueError as e:  # a name over the schema's limits: a config mistake
            log.error("device state not sent", extra={"event": "state_invalid", "error": str(e)})
            return
        with self._lock:
            self._last = self._clock()
            self._dirty = False
        if self._link.publish(self._topic, payload, qos=1, retain=True):
            self.published += 1
        else:
            with self._lock:
                self._dirty = True  # not connected: the connect hook sends it
