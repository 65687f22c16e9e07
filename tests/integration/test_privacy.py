"""THE privacy test: every byte on the broker while a real agent inspects frames.

A client subscribed to ``#`` records everything while `edge-agent run` inspects a
synthetic line with the reference ONNX bundle, sends telemetry in windows of 350 frames
(enough for every histogram to pass the 10-frames-per-bin rule, so they are on the wire),
and takes a model update from a fleet simulator (so fetch requests, chunk answers and
update events are on the wire too, and the model changes mid-run). Then every message
is checked: its topic is one of the declared ones, its payload decodes with that topic's
schema, windows pass ``check_privacy``, nothing the device sent carries image bytes or
anything per frame, and the windows add up to exactly the frames inspected.

A second, in-process test drives the reporter with a clock of its own: a window that
is due with fewer than 50 frames is not sent but merged into the next one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.inspect import Inspector
from edge_agent.pipeline import Inspection, Pipeline
from edge_agent.protocol import topics
from edge_agent.protocol.events import MAX_EVENT_BYTES, EventKind, decode_event
from edge_agent.protocol.fetch_wire import MAX_REQUEST_BYTES, decode_answer, decode_request
from edge_agent.protocol.manifest import FEATURE_NAMES
from edge_agent.protocol.notify import decode_notify
from edge_agent.protocol.state import MAX_STATE_BYTES, decode_state
from edge_agent.protocol.telemetry import (
    LATENCY_EDGES_MS,
    MAX_WINDOW_BYTES,
    MIN_WINDOW_FRAMES,
    TelemetryWindow,
    check_privacy,
    decode_window,
)
from edge_agent.sources.synthetic import SyntheticLine
from edge_agent.telemetry.alarm import DriftAlarm
from edge_agent.telemetry.publisher import WindowPublisher
from edge_agent.telemetry.reporter import TelemetryReporter
from edge_agent.telemetry.spool import Spool
from fleet_server.workers.chunk_server import ChunkServer
from tests.fleet_simulator import FleetSimulator, wait_for
from tests.integration.agent_proc import (
    DEVICE,
    Message,
    Recorder,
    agent_config,
    inspected,
    start_agent,
    stop_agent,
)
from tests.integration.reference import ONNX_BUNDLE, UNSEEN_SEED
from tests.mqtt_broker import MosquittoBroker, connect, mosquitto_broker  # noqa: F401
from tests.update_rig import make_bundle, tar_bytes

WINDOW = 350
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM6")
MAX_BYTES = {
    "state": MAX_STATE_BYTES,
    "telemetry": MAX_WINDOW_BYTES,
    "events": MAX_EVENT_BYTES,
    "fetch": MAX_REQUEST_BYTES,
}
DEVICE_KINDS = tuple(MAX_BYTES)


@pytest.fixture
def fleet(mosquitto: MosquittoBroker, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A fleet simulator serving reference-onnx 2 (assigned to the device) through the
    real chunk server; yields the trust root file and the assigned target."""
    sim = FleetSimulator(tmp_path / "served")
    v2 = make_bundle(tmp_path / "bundles" / "v2", "2")
    target = sim.add_release(
        "reference-onnx", "2", tar_bytes(v2), counter=2, profiles=("x86-generic",)
    )
    sim.assign(DEVICE, target)
    sim.publish()
    root = tmp_path / "root.json"
    root.write_bytes(sim.bootstrap_root)
    server = connect(mosquitto, "fleet-server")
    ChunkServer(server, sim.metadata_dir, sim.targets_dir)
    try:
        yield root, target
    finally:
        server.stop()


def test_every_published_byte_is_declared_aggregate_and_private(
    mosquitto: MosquittoBroker, fleet: tuple[Path, str], tmp_path: Path
) -> None:
    root, target = fleet
    recorder = Recorder(mosquitto, ["#"], client_id="privacy-observer")
    fleet_keys = f'root_metadata = "{root}"\ngate_frames = 30\ngate_timeout_s = 60'
    config = agent_config(tmp_path, mosquitto, window_frames=WINDOW, fps=300, fleet=fleet_keys)
    state_dir = tmp_path / "state"
    proc = start_agent(config)
    try:
        recorder.wait(lambda: _activated(recorder, target), 60)
        # Several windows of the new model after the swap.
        recorder.wait(lambda: _windows_of(recorder, "reference-onnx@2") >= 2, 30)
    finally:
        log = stop_agent(proc)
        state_topic = topics.state(DEVICE)
        recorder.wait(lambda: decode_state(recorder.on(state_topic)[-1]).status == "offline", 10)
        recorder.close()

    messages = recorder.snapshot()
    kinds_seen: set[str] = set()
    windows: list[TelemetryWindow] = []
    for message in messages:
        kind = _check_message(message)
        kinds_seen.add(kind)
        if kind == "telemetry":
            windows.append(decode_window(message.payload))
    assert {"state", "telemetry", "events", "fetch", "data"} <= kinds_seen, kinds_seen

    # Aggregates only: every inspected frame is in exactly one window, or in a partial
    # window the agent discarded (logged) at the model swap or the stop.
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    discarded = sum(int(e["frames"]) for e in events if e.get("event") == "window_discarded")
    seqs = [w.seq for w in windows]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "every window once, in order"
    assert sum(w.frames for w in windows) + discarded == inspected(state_dir)
    # Windows close on the frame count (window_s is long): exactly WINDOW frames each,
    # except one closed early for the swap or the stop, never below the floor.
    assert all(MIN_WINDOW_FRAMES <= w.frames <= WINDOW for w in windows)
    assert sum(w.frames == WINDOW for w in windows) >= len(windows) - 2
    # The first model's window is there unless the update won the race against its
    # first WINDOW frames (its partial window is then discarded, and counted above).
    assert "reference-onnx@2" in {w.model for w in windows}
    assert {w.model for w in windows} <= {"reference-onnx@1.0.0", "reference-onnx@2"}
    full = [w for w in windows if w.frames == WINDOW]
    assert full and all(set(w.hist) == set(FEATURE_NAMES) and w.p_sum for w in full)
    _check_list_lengths(messages)


def _activated(recorder: Recorder, target: str) -> bool:
    for payload in recorder.on(topics.events(DEVICE)):
        event = decode_event(payload)
        assert event.event not in (EventKind.GATE_FAILED, EventKind.REFUSED), event
        if event.event is EventKind.ACTIVATED and event.target == target:
            return True
    return False


def _windows_of(recorder: Recorder, model: str) -> int:
    return sum(decode_window(p).model == model for p in recorder.on(topics.telemetry(DEVICE)))


def _check_message(message: Message) -> str:
    """Check one message against its topic's schema; return the topic kind."""
    if message.topic == topics.NOTIFY:
        decode_notify(message.payload)
        return "notify"
    parsed = topics.parse(message.topic)
    assert parsed is not None, f"undeclared topic {message.topic!r}"
    device_id, kind = parsed
    assert device_id == DEVICE, f"a topic of another device: {message.topic!r}"
    payload = message.payload
    if kind == "data":  # the server's answers (bundle chunks): server -> device
        decode_answer(payload)
        return kind
    assert kind in DEVICE_KINDS
    assert len(payload) <= MAX_BYTES[kind], f"{len(payload)} bytes in a {kind} message"
    for magic in IMAGE_MAGIC:
        assert magic not in payload, f"image bytes in a {kind} message"
    assert payload.decode("utf-8").isprintable(), f"binary data in a {kind} message"
    if kind == "state":
        decode_state(payload)
    elif kind == "telemetry":
        check_privacy(decode_window(payload))
        assert not message.retain
    elif kind == "events":
        decode_event(payload)
    else:
        decode_request(payload)
    return kind


def _check_list_lengths(messages: list[Message]) -> None:
    """No list in a device message has a length that depends on the frame count: in
    windows every list length is fixed by the bundle's edges, whatever the window size."""
    reference = Inspector.open(ONNX_BUNDLE).manifest.reference
    assert reference is not None
    allowed = {f"hist.{n}": len(reference.features[n].edges) + 1 for n in FEATURE_NAMES}
    allowed |= {f"moments.{n}": 3 for n in FEATURE_NAMES}
    allowed |= {"latency": len(LATENCY_EDGES_MS) + 1, "p_sum": allowed["hist.p_defect"]}
    for message in messages:
        parsed = topics.parse(message.topic)
        if parsed is None or parsed[1] != "telemetry":
            continue
        document = json.loads(message.payload)
        assert not any("min" in key or "max" in key for key in document)
        for path, length in _lists(document, ""):
            assert path in allowed and length == allowed[path], (path, length)


def _lists(node: object, path: str) -> Iterator[tuple[str, int]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _lists(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        yield path, len(node)
        for item in node:
            assert not isinstance(item, list | dict), f"nested list in {path}"


def test_a_window_under_the_floor_is_merged_into_the_next_not_sent(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    inspector = Inspector.open(ONNX_BUNDLE)
    items: list[Inspection] = list(
        Pipeline(inspector).run(SyntheticLine(seed=UNSEEN_SEED, size=(160, 120), count=70))
    )
    transport = connect(mosquitto, DEVICE)
    recorder = Recorder(mosquitto, [topics.telemetry(DEVICE)])
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20, max_windows=100)
    publisher = WindowPublisher(spool, transport, topics.telemetry(DEVICE))
    reporter = TelemetryReporter(
        edge="0.1.0",
        window_frames=500,
        window_s=10.0,
        spool=spool,
        alarm=DriftAlarm(tmp_path / "drift.json"),
        on_window=publisher.wake,
    )
    publisher.start()
    try:
        t0 = 1_800_000_000.0
        reporter.start(inspector, t0)
        for i, item in enumerate(items[:30]):
            reporter.add(item, 0, t0 + i * 0.1)
        reporter.tick(0, t0 + 11.0)  # due by time, with 30 frames: stays open
        assert reporter.windows == 0 and reporter.flush(10) and spool.next_seq == 0
        for i, item in enumerate(items[30:]):
            reporter.add(item, 0, t0 + 11.0 + i * 0.1)
        assert reporter.windows == 0  # 70 frames, not yet 10 s since the deadline moved
        reporter.tick(0, t0 + 22.0)
        assert reporter.windows == 1 and reporter.flush(10)
        recorder.wait(lambda: len(recorder.on(topics.telemetry(DEVICE))) == 1, 10)
        assert wait_for(lambda: spool.counts().queued == 0, 10)
    finally:
        reporter.finish(t0 + 23.0)
        publisher.stop()
        transport.stop()
        recorder.close()
        inspector.close()
    (payload,) = recorder.on(topics.telemetry(DEVICE))
    window = decode_window(payload)
    assert (window.seq, window.frames, window.t0, window.t1) == (0, 70, int(t0), int(t0 + 22.0))
    assert window.model == "reference-onnx@1.0.0"


_WINDOW_40 = (
    b'{"v":1,"seq":1,"t0":1,"t1":2,"model":"m@1","edge":"0.1.0","ref":"0123456789abcdef",'
    b'"counts":{"pass":40,"fail":0,"uncertain":0,"error":0,"dropped":0}}'
)


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("edgefleet/v1/devices/line-cam-1/images", b"{}"),
        ("edgefleet/v1/frames", b"{}"),
        (topics.events(DEVICE), b'{"v":1,"event":"checking","ts":1,"detail":"\xff\xd8\xff"}'),
        (topics.telemetry(DEVICE), _WINDOW_40),
        (topics.telemetry(DEVICE), _WINDOW_40.replace(b"40", b"400")[:-1] + b',"max":[1]}'),
        (topics.state(DEVICE), b'{"v":1,"status":"online","frame":[1,2,3]}'),
        (topics.fetch(DEVICE), b"\x89PNG\r\n"),
    ],
    ids=["undeclared-kind", "undeclared-topic", "jpeg", "40-frames", "max-key", "state", "png"],
)
def test_the_checker_refuses_what_must_not_leave(topic: str, payload: bytes) -> None:
    with pytest.raises((AssertionError, ValueError)):
        _check_message(Message(topic, payload, False))
