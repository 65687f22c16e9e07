"""A thin wrapper around a paho-mqtt 2.x client: connection, publish, subscribe. No policy.

The network runs on paho's own thread (`loop_start`). The client reconnects by itself with
exponential back-off between `reconnect_min_s` and `reconnect_max_s`, and every
subscription is made again after each (re)connect, because sessions are clean.
Handlers and connect hooks run on the network thread: they must be quick and must not
block on it.

`publish_tracked` hands back a `Delivery` that completes on the broker's PUBACK. A QoS 1
message that paho has accepted stays in paho's outgoing queue across disconnects and is
resent (with DUP) after the reconnect, so the caller waits on the same `Delivery` for as
long as it takes and never publishes the message again itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

Handler = Callable[[str, bytes], None]
ConnectHook = Callable[[], None]


class Delivery:
    """One QoS 1 message handed to paho: done once the broker has acknowledged it."""

    __slots__ = ("_info",)

    def __init__(self, info: mqtt.MQTTMessageInfo) -> None:
        self._info = info

    @property
    def mid(self) -> int:
        return self._info.mid

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for the PUBACK; return whether it came.

        False only means "not yet": the message stays queued in paho (and is resent after
        a reconnect), so waiting again later is right and publishing again is not.
        """
        self._info.wait_for_publish(timeout)
        return self._info.is_published()

    @property
    def done(self) -> bool:
        return self._info.is_published()


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for mutual TLS: the broker's CA, and this client's certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


class MqttTransport:
    """One MQTT connection. Thread-safe: publish and subscribe may be called from any thread.

    Args:
        host, port: the broker.
        client_id: the MQTT client id (the device id on a device).
        tls: client certificate files; None for plain TCP (tests, loopback only).
        keepalive: seconds between pings when idle; the broker declares the client dead
            (and publishes the will) after 1.5 times this without traffic.
        will: ``(topic, payload, retain)`` published by the broker, QoS 1, when this client
            goes away without a clean DISCONNECT.
        reconnect_min_s, reconnect_max_s: bounds of the reconnect back-off.
        max_queued: QoS > 0 messages that may wait for a PUBACK; beyond this `publish`
            returns False.
        logger: where connection changes and handler failures are logged.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        tls: TlsFiles | None = None,
        keepalive: int = 30,
        will: tuple[str, bytes, bool] | None = None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        max_queued: int = 1000,
        logger: logging.Logger | None = None,
    ) -> None:
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        self._host = host
        self._port = port
        self._keepalive = keepalive
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._subscriptions: dict[str, int] = {}  # filter -> QoS, re-made on each connect
        self._connected = threading.Event()
        self._connect_hooks: list[ConnectHook] = []
        self._started = False
        self._stopping = False  # set once by stop(); a transport is not restartable

        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
        )
        if tls is not None:
            client.tls_set(
                ca_certs=str(tls.ca_file),
                certfile=str(tls.cert_file),
                keyfile=str(tls.key_file),
            )
        if will is not None:
            will_topic, will_payload, will_retain = will
            client.will_set(will_topic, will_payload, qos=1, retain=will_retain)
        # paho annotates the delays as int, but only does float arithmetic with them.
        client.reconnect_delay_set(
            min_delay=reconnect_min_s,  # type: ignore[arg-type]
            max_delay=reconnect_max_s,  # type: ignore[arg-type]
        )
        client.max_queued_messages_set(max_queued)
        # No client.enable_logger(): paho 2.2 logs a spurious ERROR ("Client is not
        # connected. Socket: None") after many clean disconnects. Connection changes and
        # handler failures are logged here instead.
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the next disconnect."""
        return self._connected.is_set()

    def start(self) -> None:
        """Begin connecting in the background; returns at once even if the broker is down.

        Raises:
            RuntimeError: called twice, or after `stop`.
        """
        if self._started or self._stopping:
            raise RuntimeError("MqttTransport.start() called twice or after stop()")
        self._started = True
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Block up to `timeout` seconds for a connection; return whether there is one."""
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Hand a message to the network thread; never raises for network trouble.

        Returns False when not connected or when `max_queued` messages await a PUBACK.
        True means queued for sending, not delivered. A QoS 1 message that was accepted
        and is cut off by a disconnect is resent after the reconnect (at least once).
        Rarely, a publish racing a disconnect returns False and is still resent later.

        Raises:
            ValueError: invalid topic (empty, wildcards) or QoS (a programming error).
        """
        if not self._connected.is_set():
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish_tracked(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> Delivery | None:
        """Publish at QoS 1 and return a `Delivery` that completes on the PUBACK.

        Returns None, and nothing is queued, when not connected or when `max_queued`
        messages await a PUBACK: the caller tries again later. Otherwise the message is
        paho's to deliver, across reconnects, until the transport is stopped.

        Raises:
            ValueError: invalid topic (a programming error).
        """
        if not self._connected.is_set():
            return None
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            # The connection dropped between the check and the send. paho has kept the
            # QoS 1 message in its outgoing queue and sends it after the reconnect; it
            # only leaves rc at NO_CONN, which would make wait_for_publish raise.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None  # MQTT_ERR_QUEUE_SIZE: not queued at all
        return Delivery(info)

    def add_connect_hook(self, hook: ConnectHook) -> None:
        """Call ``hook()`` on the network thread after every (re)connect, once `publish`
        works (e.g. to publish a retained "online" state); at once if connected now.
        A hook must be quick and must not raise: paho would end the network loop."""
        with self._lock:
            self._connect_hooks.append(hook)
        if self._connected.is_set():
            hook()

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Call `handler(topic, payload)` on the network thread for each matching message.

        The subscription is kept and made again after every reconnect. A second call with
        the same filter replaces the handler. An exception raised by `handler` is logged
        with the topic and the next message is delivered as usual.
        """
        self._subscribe(topic_filter, topic_filter, handler, qos)

    def subscribe_shared(
        self, group: str, topic_filter: str, handler: Handler, qos: int = 1
    ) -> None:
        """`subscribe`, as the shared subscription ``$share/<group>/<topic_filter>``: the
        broker gives each matching message to one of the group's subscribers (MQTT 5;
        Mosquitto 2 also for MQTT 3.1.1 clients). Brokers send no retained messages on a
        shared subscription.

        Raises:
            ValueError: ``group`` is empty or holds ``/``, ``+`` or ``#``.
        """
        if not group or any(c in group for c in "/+#"):
            raise ValueError(f"invalid shared subscription group: {group!r}")
        self._subscribe(topic_filter, f"$share/{group}/{topic_filter}", handler, qos)

    def _subscribe(self, topic_filter: str, wire_filter: str, handler: Handler, qos: int) -> None:
        # Handler first: a retained message may arrive as soon as the filter is known.
        # paho matches delivered topics against the plain filter, never a $share one.
        self._client.message_callback_add(topic_filter, self._dispatcher(topic_filter, handler))
        with self._lock:
            self._subscriptions[wire_filter] = qos
        if self._connected.is_set():
            # If not connected (or the connection drops now), _on_connect subscribes.
            self._client.subscribe(wire_filter, qos=qos)

    def stop(self) -> None:
        """Disconnect cleanly (the will is not published) and stop the network thread.

        Idempotent; the transport cannot be started again.
        """
        if self._stopping:
            return
        self._stopping = True
        if not self._started:
            return
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def _dispatcher(
        self, topic_filter: str, handler: Handler
    ) -> Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]:
        def dispatch(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
            # paho re-raises a callback's exception and that ends loop_forever, i.e. the
            # connection; a handler bug must cost one message, not the link.
            try:
                handler(message.topic, bytes(message.payload))
            except Exception:
                self._logger.exception(
                    "MQTT handler for %r failed on topic %r", topic_filter, message.topic
                )

        return dispatch

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._logger.warning(
                "MQTT broker %s:%d refused the connection: %s", self._host, self._port, reason_code
            )
            return
        with self._lock:
            wanted = list(self._subscriptions.items())
        if wanted:
            client.subscribe(wanted)
        self._logger.info("MQTT connected to %s:%d", self._host, self._port)
        # Set only after the SUBSCRIBE is queued, so a publish that follows
        # wait_connected() reaches the broker after it.
        self._connected.set()
        with self._lock:
            hooks = list(self._connect_hooks)
        for hook in hooks:
            hook()

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._stopping:
            self._logger.info("MQTT disconnected from %s:%d", self._host, self._port)
        elif was_connected:
            self._logger.warning(
                "MQTT connection to %s:%d lost (%s); reconnecting",
                self._host,
                self._port,
                reason_code,
            )

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        # Reached when no filter matches, or when the topic is not valid UTF-8.
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "<not UTF-8>"
        self._logger.debug("MQTT message on %r without a handler", topic)
