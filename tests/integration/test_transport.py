"""MqttTransport against a real Mosquitto on a loopback port: bytes, QoS 1, retain, will,
reconnect, and the failure paths (broker down, closed port, a handler that raises).

Messages between two different clients are only ordered after a `_barrier`: a round trip
through the broker on the subscriber's own connection, which proves its SUBSCRIBEs were
processed. No fixed sleeps: everything polls against a deadline.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent.protocol import topics
from edge_agent.transport import MqttTransport
from tests.mqtt_broker import MosquittoBroker, free_port, mosquitto_broker  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 5.0


class Inbox:
    """A handler that records ``(topic, payload)`` and lets the test wait for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.messages: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.messages.append((topic, payload))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = TIMEOUT_S) -> list[tuple[str, bytes]]:
        with self._cond:
            arrived = self._cond.wait_for(lambda: len(self.messages) >= count, timeout)
            assert arrived, f"got {len(self.messages)} of {count} messages in {timeout} s"
            return list(self.messages)

    @property
    def payloads(self) -> list[bytes]:
        with self._cond:
            return [payload for _, payload in self.messages]


def _barrier(transport: MqttTransport) -> None:
    """Return once the broker has processed everything `transport` sent before."""
    topic = f"test/barrier/{uuid.uuid4().hex}"
    inbox = Inbox()
    transport.subscribe(topic, inbox)
    assert transport.publish(topic, b"sync")
    inbox.wait_for(1)


def _poll(condition: Callable[[], bool], timeout: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


Factory = Callable[..., MqttTransport]


@pytest.fixture
def make_transport(mosquitto: MosquittoBroker) -> Iterator[Factory]:
    """Build transports for this test's broker; all are stopped at the end."""
    made: list[MqttTransport] = []

    def make(
        *,
        port: int | None = None,
        start: bool = True,
        will: tuple[str, bytes, bool] | None = None,
        reconnect_max_s: float = 0.5,
    ) -> MqttTransport:
        transport = MqttTransport(
            host=mosquitto.host,
            port=mosquitto.port if port is None else port,
            client_id=f"test-{uuid.uuid4().hex[:12]}",
            will=will,
            reconnect_min_s=0.05,
            reconnect_max_s=reconnect_max_s,
            logger=logging.getLogger("test.transport"),
        )
        made.append(transport)
        if start:
            transport.start()
            assert transport.wait_connected(TIMEOUT_S)
        return transport

    yield make
    for transport in made:
        transport.stop()


def test_binary_payloads_round_trip_exactly(make_transport: Factory) -> None:
    transport = make_transport(start=False)
    inbox = Inbox()
    transport.subscribe("test/bin/#", inbox)
    transport.start()
    assert transport.wait_connected(TIMEOUT_S)
    sent = [
        ("test/bin/all-bytes", bytes(range(256))),
        ("test/bin/64k", random.Random(7).randbytes(64 * 1024)),
        ("test/bin/empty", b""),
        ("test/bin/nul", b"\x00"),
    ]
    for topic, payload in sent:
        assert transport.publish(topic, payload)
    assert inbox.wait_for(len(sent)) == sent


def test_qos1_burst_between_clients_arrives_complete_and_in_order(
    make_transport: Factory,
) -> None:
    subscriber = make_transport()
    inbox = Inbox()
    subscriber.subscribe("test/qos1", inbox, qos=1)
    _barrier(subscriber)
    publisher = make_transport()
    sent = [i.to_bytes(4, "big") for i in range(300)]
    for payload in sent:
        assert publisher.publish("test/qos1", payload, qos=1)
    inbox.wait_for(len(sent))
    assert inbox.payloads == sent


def test_retained_message_reaches_a_late_subscriber(make_transport: Factory) -> None:
    publisher = make_transport()
    state = topics.state("cam-7")
    assert publisher.publish(state, b"online", retain=True)
    _barrier(publisher)  # the broker now holds the retained message
    late = make_transport(start=False)
    inbox = Inbox()
    late.subscribe(state, inbox)
    late.start()
    assert inbox.wait_for(1) == [(state, b"online")]


_WILL_CHILD = textwrap.dedent(
    """
    import sys, time
    from edge_agent.protocol import topics
    from edge_agent.transport import MqttTransport

    host, port, device_id = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    transport = MqttTransport(
        host=host, port=port, client_id=device_id,
        will=(topics.state(device_id), b"offline", True),
    )
    transport.start()
    print("connected" if transport.wait_connected(5.0) else "failed", flush=True)
    time.sleep(60)
    """
)


def test_last_will_is_published_and_retained_when_a_client_dies(
    mosquitto: MosquittoBroker, make_transport: Factory
) -> None:
    device_id = f"cam-{uuid.uuid4().hex[:8]}"
    state = topics.state(device_id)
    watcher = make_transport()
    inbox = Inbox()
    watcher.subscribe(state, inbox)
    _barrier(watcher)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _WILL_CHILD, mosquitto.host, str(mosquitto.port), device_id],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"connected\n"
        assert inbox.payloads == []
        # SIGKILL: the socket closes without DISCONNECT, as when a device loses power.
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()

    assert inbox.wait_for(1) == [(state, b"offline")]
    late = make_transport(start=False)
    late_inbox = Inbox()
    late.subscribe(state, late_inbox)
    late.start()
    assert late_inbox.wait_for(1) == [(state, b"offline")]


def test_clean_stop_does_not_publish_the_will(make_transport: Factory) -> None:
    state = topics.state("cam-clean")
    watcher = make_transport()
    inbox = Inbox()
    watcher.subscribe(state, inbox)
    _barrier(watcher)
    leaving = make_transport(will=(state, b"offline", True))
    leaving.stop()
    assert not leaving.connected
    # A will would be published when the broker saw the socket close, before this marker.
    assert watcher.publish(state, b"marker")
    assert inbox.wait_for(1) == [(state, b"marker")]


def test_reconnects_after_broker_restart_and_resubscribes(
    mosquitto: MosquittoBroker, make_transport: Factory
) -> None:
    transport = make_transport(start=False, reconnect_max_s=0.2)
    inbox = Inbox()
    transport.subscribe("test/restart", inbox)
    transport.start()
    assert transport.wait_connected(TIMEOUT_S)
    assert transport.publish("test/restart", b"before")
    inbox.wait_for(1)

    mosquitto.stop()
    assert _poll(lambda: not transport.connected)
    assert transport.publish("test/restart", b"while-down") is False
    assert transport.publish("test/restart", b"while-down", qos=0) is False

    mosquitto.start()  # same port, fresh broker: no session, no subscriptions
    assert transport.wait_connected(TIMEOUT_S)
    _barrier(transport)
    other = make_transport()
    assert other.publish("test/restart", b"after")
    inbox.wait_for(2)
    # Nothing refused while down is sent later.
    assert inbox.payloads == [b"before", b"after"]


def test_a_raising_handler_does_not_stop_delivery(
    make_transport: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="test.transport")
    inbox = Inbox()

    def fragile(topic: str, payload: bytes) -> None:
        if payload == b"boom":
            raise RuntimeError("handler bug")
        inbox(topic, payload)

    transport = make_transport()
    transport.subscribe("test/fragile", fragile)
    _barrier(transport)
    assert transport.publish("test/fragile", b"boom")
    assert transport.publish("test/fragile", b"fine")
    assert inbox.wait_for(1) == [("test/fragile", b"fine")]
    assert transport.connected
    failures = [r for r in caplog.records if r.name == "test.transport" and r.exc_info]
    assert len(failures) == 1
    assert "test/fragile" in failures[0].getMessage()
    assert isinstance(failures[0].exc_info[1], RuntimeError)  # type: ignore[index]


def test_start_against_a_closed_port_returns_at_once(make_transport: Factory) -> None:
    transport = make_transport(port=free_port(), start=False)
    began = time.monotonic()
    transport.start()
    assert time.monotonic() - began < 0.2
    assert transport.wait_connected(0.5) is False
    assert transport.publish("test/nowhere", b"x") is False
    began = time.monotonic()
    transport.stop()
    assert time.monotonic() - began < 2.0


def test_start_twice_or_after_stop_is_misuse(make_transport: Factory) -> None:
    transport = make_transport()
    with pytest.raises(RuntimeError):
        transport.start()
    transport.stop()
    transport.stop()  # idempotent
    assert not transport.connected
    assert transport.publish("test/after-stop", b"x") is False
    with pytest.raises(RuntimeError):
        transport.start()
