"""Store and forward against a real Mosquitto and a real `edge-agent run`: windows go to the
spool while the broker is down and are sent in order after it is back; the line keeps
inspecting throughout; the retained state says online, then offline."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent.protocol import topics
from edge_agent.protocol.state import Status, decode_state
from edge_agent.protocol.telemetry import decode_window
from edge_agent.telemetry.device import spool_dir
from edge_agent.telemetry.spool import read_counts
from edge_agent.transport import MqttTransport
from tests.fleet_simulator import wait_for
from tests.integration.agent_proc import (
    DEVICE,
    Recorder,
    agent_config,
    inspected,
    start_agent,
    stop_agent,
)
from tests.mqtt_broker import MosquittoBroker

WINDOW = 50
TELEMETRY = topics.telemetry(DEVICE)
STATE = topics.state(DEVICE)


class PersistentBroker(MosquittoBroker):
    """Mosquitto that keeps sessions across a restart, so the test's persistent recorder
    misses nothing the agent sends while the recorder is reconnecting."""

    def __init__(self) -> None:
        super().__init__()
        text = self._conf.read_text().replace("persistence false\n", "")
        text += f"persistence true\npersistence_location {self._dir}/\n"
        self._conf.write_text(text)


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    with PersistentBroker() as b:
        yield b


def _seqs(payloads: list[bytes]) -> list[int]:
    return [decode_window(p).seq for p in payloads]


def test_windows_are_spooled_while_the_broker_is_down_and_sent_in_order_after(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    recorder = Recorder(broker, [TELEMETRY, STATE], persistent=True)
    state_dir = tmp_path / "state"
    proc = start_agent(agent_config(tmp_path, broker, window_frames=WINDOW, fps=150))
    try:
        recorder.wait(lambda: len(recorder.on(TELEMETRY)) >= 2, 30)
        states = [decode_state(p) for p in recorder.on(STATE)]
        assert states and states[0].status is Status.ONLINE
        assert states[0].model == "reference-onnx@1.0.0" and states[0].line == "line-1"

        broker.stop()
        frames_at_outage = inspected(state_dir)
        assert wait_for(lambda: _queued(state_dir) >= 4, 30), "windows are not spooled"
        assert inspected(state_dir) > frames_at_outage + 3 * WINDOW, "the line stalled"
        assert proc.poll() is None

        states_before = len(recorder.on(STATE))
        broker.start()
        assert wait_for(lambda: _queued(state_dir) == 0, 30), "the backlog is not sent"
        # The reconnect published the state again (connect hook) with the backlog in its
        # counts; once the backlog is sent, the state is refreshed to an empty spool.
        recorder.wait(lambda: _online_states(recorder, states_before, lambda q: q >= 4), 10)
        recorder.wait(lambda: _online_states(recorder, states_before, lambda q: q == 0), 10)
        frames_after = inspected(state_dir)
        assert wait_for(lambda: inspected(state_dir) > frames_after + WINDOW, 10)
    finally:
        log = stop_agent(proc)
        recorder.wait(lambda: decode_state(recorder.on(STATE)[-1]).status is Status.OFFLINE, 10)
        recorder.close()

    seqs = _seqs(recorder.on(TELEMETRY))
    # In order, with no gap. A repeat is allowed only where QoS 1 redelivers a window the
    # broker took just as it went down: right after its first copy.
    distinct = [s for i, s in enumerate(seqs) if i == 0 or s != seqs[i - 1]]
    assert distinct == list(range(distinct[0], distinct[0] + len(distinct))), seqs
    assert len(seqs) - len(distinct) <= 1, f"repeats beyond one redelivery: {seqs}"
    counts = read_counts(spool_dir(state_dir))
    assert counts is not None and counts.dropped == 0
    # Every window the agent closed was sent (the last one at the stop included).
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "telemetry_backlog_sent" for e in events)
    assert counts.next_seq == distinct[-1] + 1
    assert counts.queued == 0


def _online_states(recorder: Recorder, since: int, queued: Callable[[int], bool]) -> bool:
    states = [decode_state(p) for p in recorder.on(STATE)[since:]]
    return any(s.status is Status.ONLINE and queued(s.spool_queued or 0) for s in states)


def _queued(state_dir: Path) -> int:
    counts = read_counts(spool_dir(state_dir))
    return 0 if counts is None else counts.queued


def test_spool_survives_an_agent_restart_without_a_broker(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    broker.stop()
    state_dir = tmp_path / "state"
    config = agent_config(tmp_path, broker, window_frames=WINDOW, fps=None, count=3 * WINDOW + 10)
    stop_agent(start_agent(config), signal_it=False)  # the source ends: the agent stops
    first = read_counts(spool_dir(state_dir))
    assert first is not None and first.queued == 3
    recorder_started = time.monotonic()
    broker.start()
    recorder = Recorder(broker, [TELEMETRY])
    try:
        proc = start_agent(config)
        recorder.wait(lambda: len(recorder.on(TELEMETRY)) >= 6, 30)
        # The source ends by itself: a SIGTERM now could land in the interpreter's
        # shutdown, after the agent's own handler is gone.
        stop_agent(proc, signal_it=False)
    finally:
        recorder.close()
    seqs = _seqs(recorder.on(TELEMETRY))
    assert seqs[:3] == [first.next_seq - 3, first.next_seq - 2, first.next_seq - 1]
    assert seqs == sorted(set(seqs))
    assert time.monotonic() - recorder_started < 60


def test_tracked_delivery_completes_on_puback_and_hooks_run_on_each_connect(
    broker: MosquittoBroker,
) -> None:
    connects: list[bool] = []
    transport = MqttTransport(
        host=broker.host,
        port=broker.port,
        client_id="tracked",
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
    )
    transport.add_connect_hook(lambda: connects.append(transport.connected))
    assert transport.publish_tracked(TELEMETRY, b"x") is None, "not connected: not queued"
    transport.start()
    try:
        assert transport.wait_connected(5)
        delivery = transport.publish_tracked(TELEMETRY, b"x")
        assert delivery is not None and delivery.wait(5) and delivery.done
        broker.restart()
        assert wait_for(lambda: len(connects) >= 2, 10), "the hook did not run on reconnect"
        assert all(connects), "hooks run once publish works"
    finally:
        transport.stop()
