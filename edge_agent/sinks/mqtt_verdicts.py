"""Verdicts to the plant's own MQTT broker, one message per verdict, for line controllers
and SCADA.

This is a connection of its own, to the plant's broker, apart from the fleet connection
(``[fleet] broker``): per-frame verdicts stay inside the plant. Messages are
``encode_event`` JSON (docs/line-outputs.md), never retained (a retained verdict would
tell a controller that connects later about an item long gone).

When the broker is away, a verdict fails at once and is counted as dropped: nothing is
buffered beyond paho's bounded in-flight window (QoS 1 only), so a controller that comes
back sees current verdicts, not a stale backlog.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from edge_agent.protocol import topics
from edge_agent.sinks.outputs import LineOutputError, OutputUnavailable, VerdictEvent, encode_event
from edge_agent.transport import MqttTransport, TlsFiles

log = logging.getLogger("edge_agent.outputs.mqtt")

_MAX_TOPIC_BYTES: Final = 65535  # MQTT's limit on a topic's UTF-8 length


class TopicError(ValueError):
    """A configured verdict topic cannot be used; the message names it and says why."""


def validate_verdict_topic(topic: str) -> str:
    """Return ``topic`` unchanged if verdicts may be published on it.

    Raises:
        TopicError: empty, too long, contains a wildcard (``+`` ``#``) or NUL, starts
            with ``$`` (broker-reserved), or lies under the fleet prefix ``edgefleet/v1/``
            (those topics belong to the fleet protocol; a plant topic there would be
            mistaken for fleet traffic, and fleet ACLs would refuse it).
    """
    reason = None
    if not topic:
        reason = "it is empty"
    elif len(topic.encode()) > _MAX_TOPIC_BYTES:
        reason = f"it is longer than {_MAX_TOPIC_BYTES} bytes"
    elif "+" in topic or "#" in topic:
        reason = "wildcards (+ #) are for subscriptions, not for publishing"
    elif "\0" in topic:
        reason = "it contains a NUL character"
    elif topic.startswith("$"):
        reason = "topics starting with $ are reserved by the broker"
    elif topic.startswith(topics.PREFIX) or topic == topics.PREFIX.rstrip("/"):
        reason = f"{topics.PREFIX} is the fleet protocol's namespace"
    if reason is not None:
        shown = topic if len(topic) <= 80 else topic[:80] + "..."
        raise TopicError(f"verdict topic {shown!r} cannot be used: {reason}")
    return topic


@dataclass(frozen=True, slots=True)
class MqttVerdictSettings:
    """Where and how verdicts are published.

    Args:
        host, port: the plant's broker.
        client_id: this output's MQTT client id (must differ from the fleet one if both
            go to the same broker, or the broker would drop one of the two).
        topic: validated by ``validate_verdict_topic``.
        qos: 0 (default: a lost verdict is cheaper than a delayed one) or 1.
        tls: client certificate files, or None for plain TCP.
        max_inflight: QoS 1 messages that may await a PUBACK; beyond that, verdicts drop.

    Raises:
        TopicError: a bad topic.
        ValueError: a QoS other than 0 or 1, or max_inflight < 1.
    """

    host: str
    port: int
    client_id: str
    topic: str
    qos: int = 0
    tls: TlsFiles | None = None
    keepalive: int = 30
    max_inflight: int = 1000

    def __post_init__(self) -> None:
        validate_verdict_topic(self.topic)
        if self.qos not in (0, 1):
            raise ValueError(f"verdict QoS must be 0 or 1, not {self.qos}")
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")


class MqttVerdicts:
    """The local MQTT verdict output (an ``Output``). ``start`` begins connecting.

    ``emit`` raises OutputUnavailable (counted as a drop by QueuedOutput) when the broker
    is not connected or the QoS 1 in-flight window is full; it never blocks on the
    network.
    """

    def __init__(self, settings: MqttVerdictSettings, *, name: str = "mqtt-verdicts") -> None:
        self.settings = settings
        self._name = name
        self._transport = MqttTransport(
            host=settings.host,
            port=settings.port,
            client_id=settings.client_id,
            tls=settings.tls,
            keepalive=settings.keepalive,
            max_queued=settings.max_inflight,
            logger=log,
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def connected(self) -> bool:
        return self._transport.connected

    def start(self) -> None:
        """Begin connecting in the background; returns at once even if the broker is down."""
        self._transport.start()

    def wait_connected(self, timeout: float) -> bool:
        """Block up to ``timeout`` s for the connection; return whether there is one."""
        return self._transport.wait_connected(timeout)

    def emit(self, event: VerdictEvent) -> None:
        """Publish one verdict.

        Raises:
            OutputUnavailable: not connected, or too many QoS 1 messages in flight.
        """
        s = self.settings
        try:
            sent = self._transport.publish(s.topic, encode_event(event), qos=s.qos, retain=False)
        except ValueError as e:  # paho refusing the topic or payload: checked up front
            raise LineOutputError(f"verdict for frame {event.frame_id} refused: {e}") from e
        if not sent:
            raise OutputUnavailable(
                f"broker {s.host}:{s.port} not connected (or QoS 1 window full); "
                f"verdict for frame {event.frame_id} dropped"
            )

    def close(self) -> None:
        """Disconnect cleanly; idempotent."""
        self._transport.stop()
