"""Local MQTT verdicts against a real Mosquitto: one message per verdict, in order, with
the documented JSON; a broker that is down costs counted drops and never blocks; topic
validation names the bad topic.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from edge_agent.core.verdict import Outcome
from edge_agent.sinks.mqtt_verdicts import (
    MqttVerdicts,
    MqttVerdictSettings,
    TopicError,
    validate_verdict_topic,
)
from edge_agent.sinks.outputs import (
    OutputUnavailable,
    QueuedOutput,
    VerdictEvent,
    encode_event,
)
from edge_agent.transport import MqttTransport
from tests.fleet_simulator import wait_for
from tests.mqtt_broker import MosquittoBroker, connect, free_port, mosquitto_broker  # noqa: F401

TOPIC = "plant/line-3/inspection/verdicts"
WAIT_S = 10.0
FIELDS = {"v", "frame", "ts", "outcome", "label", "p", "latency_ms", "model", "error"}


class Inbox:
    """Payloads received by a subscriber, in arrival order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.payloads: list[bytes] = []

    def __call__(self, _topic: str, payload: bytes) -> None:
        with self._lock:
            self.payloads.append(payload)

    def count(self) -> int:
        with self._lock:
            return len(self.payloads)


def poll(condition: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    return wait_for(condition, timeout, interval_s=0.005)


def subscribed(broker: MosquittoBroker, topic: str) -> tuple[MqttTransport, Inbox]:
    """A subscriber on ``topic`` whose SUBSCRIBE the broker has processed (a round trip
    on its own connection proves it)."""
    sub = connect(broker, f"sub-{uuid.uuid4().hex[:8]}")
    inbox = Inbox()
    sub.subscribe(topic, inbox)
    barrier, marks = f"test/barrier/{uuid.uuid4().hex}", Inbox()
    sub.subscribe(barrier, marks)
    assert sub.publish(barrier, b"sync")
    assert poll(lambda: marks.count() == 1)
    return sub, inbox


def events(n: int) -> list[VerdictEvent]:
    cycle = [Outcome.PASS, Outcome.FAIL, Outcome.UNCERTAIN, Outcome.ERROR]
    out = []
    for i in range(n):
        outcome = cycle[i % 4]
        error = outcome is Outcome.ERROR
        out.append(
            VerdictEvent(
                frame_id=i,
                captured_at=1_732_392_000.0 + i / 30,
                outcome=outcome,
                label="" if error else "defect",
                p_defect=None if error else i / n,
                latency_ms=7.5,
                model="widget@1.2.0",
                error="truncated JPEG" if error else None,
            )
        )
    return out


@pytest.fixture
def verdicts_to(mosquitto: MosquittoBroker) -> Iterator[Callable[[int], MqttVerdicts]]:
    made: list[MqttVerdicts] = []

    def make(qos: int) -> MqttVerdicts:
        settings = MqttVerdictSettings(
            host=mosquitto.host, port=mosquitto.port, client_id="line-3-verdicts",
            topic=TOPIC, qos=qos,
        )  # fmt: skip
        output = MqttVerdicts(settings)
        made.append(output)
        output.start()
        assert output.wait_connected(WAIT_S)
        return output

    yield make
    for output in made:
        output.close()


@pytest.mark.parametrize("qos", [0, 1])
def test_one_message_per_verdict_in_order(
    mosquitto: MosquittoBroker, verdicts_to: Callable[[int], MqttVerdicts], qos: int
) -> None:
    sub, inbox = subscribed(mosquitto, TOPIC)
    try:
        queued = QueuedOutput(verdicts_to(qos), queue_size=256)
        sent = events(200)
        for e in sent:
            queued.offer(e)
        assert poll(lambda: inbox.count() >= len(sent)), f"got {inbox.count()} of {len(sent)}"
        assert queued.close(WAIT_S)
        time.sleep(0.1)  # a duplicate or stray message would arrive by now
        assert inbox.payloads == [encode_event(e) for e in sent]
        assert queued.counters.delivered == len(sent)
        assert queued.counters.dropped == queued.counters.failed == 0
    finally:
        sub.stop()
    first, fourth = json.loads(inbox.payloads[1]), json.loads(inbox.payloads[3])
    assert set(first) == FIELDS
    assert first == {
        "v": 1,
        "frame": 1,
        "ts": round(1_732_392_000.0 + 1 / 30, 6),
        "outcome": "fail",
        "label": "defect",
        "p": 0.005,
        "latency_ms": 7.5,
        "model": "widget@1.2.0",
        "error": None,
    }
    assert (fourth["outcome"], fourth["p"], fourth["error"]) == ("error", None, "truncated JPEG")


def test_broker_down_counts_drops_and_never_blocks() -> None:
    port = free_port()  # nothing listens here
    output = MqttVerdicts(
        MqttVerdictSettings(host="127.0.0.1", port=port, client_id="v", topic=TOPIC, qos=1)
    )
    output.start()
    queued = QueuedOutput(output, queue_size=1000)
    try:
        started = time.perf_counter()
        with pytest.raises(OutputUnavailable, match=f"127.0.0.1:{port}"):
            output.emit(events(1)[0])
        assert time.perf_counter() - started < 0.05  # fails fast, no connect attempt inline
        started = time.perf_counter()
        for e in events(1000):
            queued.offer(e)
        offer_s = time.perf_counter() - started
        assert offer_s < 0.5
        assert poll(lambda: queued.counters.dropped == 1000)
        assert (queued.counters.delivered, queued.counters.failed) == (0, 0)
    finally:
        assert queued.close(WAIT_S)


def test_broker_lost_mid_stream_drops_then_recovers(
    mosquitto: MosquittoBroker, verdicts_to: Callable[[int], MqttVerdicts]
) -> None:
    output = verdicts_to(0)
    queued = QueuedOutput(output, queue_size=64)
    mosquitto.stop()
    assert poll(lambda: not output.connected)
    started = time.perf_counter()
    for e in events(100):
        queued.offer(e)
    assert time.perf_counter() - started < 0.5
    assert poll(lambda: queued.counters.dropped == 100)
    mosquitto.start()
    assert output.wait_connected(WAIT_S)  # the transport reconnects by itself
    sub, inbox = subscribed(mosquitto, TOPIC)
    try:
        queued.offer(events(1)[0])
        assert poll(lambda: inbox.count() == 1)
        assert queued.counters.delivered == 1
    finally:
        sub.stop()
        queued.close(WAIT_S)


def test_a_hung_broker_fills_the_qos1_window_then_drops(mosquitto: MosquittoBroker) -> None:
    settings = MqttVerdictSettings(
        host=mosquitto.host, port=mosquitto.port, client_id="v", topic=TOPIC, qos=1,
        max_inflight=5,
    )  # fmt: skip
    output = MqttVerdicts(settings)
    output.start()
    assert output.wait_connected(WAIT_S)
    queued = QueuedOutput(output, queue_size=64)
    assert mosquitto._proc is not None
    os.kill(mosquitto._proc.pid, signal.SIGSTOP)  # connected, but no PUBACK ever comes
    try:
        started = time.perf_counter()
        for e in events(50):
            queued.offer(e)
        assert time.perf_counter() - started < 0.5
        assert poll(lambda: queued.counters.delivered + queued.counters.dropped == 50)
        assert queued.counters.delivered == 5  # handed to paho: the in-flight window
        assert queued.counters.dropped == 45
    finally:
        os.kill(mosquitto._proc.pid, signal.SIGCONT)
        queued.close(WAIT_S)


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "plant/+/verdicts",
        "plant/line-3/#",
        "#",
        "$SYS/verdicts",
        "edgefleet/v1/devices/cam-7/verdicts",
        "edgefleet/v1",
        "plant/\0/verdicts",
        "p" * 70_000,
    ],
    ids=["empty", "plus", "hash", "hash-only", "dollar", "fleet", "fleet-root", "nul", "long"],
)
def test_bad_topics_are_refused_by_name(topic: str) -> None:
    with pytest.raises(TopicError) as err:
        validate_verdict_topic(topic)
    assert repr(topic)[:30] in str(err.value)
    with pytest.raises(TopicError):
        MqttVerdictSettings(host="127.0.0.1", port=1883, client_id="v", topic=topic)


@pytest.mark.parametrize(
    "topic", ["plant/line-3/verdicts", "edgefleet/v2/verdicts", "edgefleet-v1/x", "a"]
)
def test_good_topics_pass(topic: str) -> None:
    assert validate_verdict_topic(topic) == topic


@pytest.mark.parametrize(("qos", "inflight"), [(2, 100), (-1, 100), (0, 0)])
def test_bad_qos_or_window(qos: int, inflight: int) -> None:
    with pytest.raises(ValueError, match=r"QoS|max_inflight"):
        MqttVerdictSettings(
            host="h", port=1, client_id="c", topic=TOPIC, qos=qos, max_inflight=inflight
        )
