"""Batched telemetry storage and the drift feed: real SQLite and PostgreSQL, a real
Mosquitto, real encoded windows (``hil.ingest_bench.window_templates``: the agent's
window accumulator over the ONNX reference bundle's profile).
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from edge_agent.protocol import topics
from edge_agent.protocol.state import DeviceState, Status, encode_state
from edge_agent.protocol.telemetry import TelemetryWindow, encode_window
from edge_agent.transport import MqttTransport
from fleet_server.storage import AlertStore, StorageError, TelemetryStore, open_database
from fleet_server.storage.telemetry_store import IncomingWindow
from fleet_server.workers.drift_feed import DriftFeed
from fleet_server.workers.drift_monitor import FleetDriftMonitor
from fleet_server.workers.ingest import TelemetryIngest
from fleet_server.workers.references import ReferenceLibrary
from hil.bench_windows import ONNX_BUNDLE, window_templates
from tests.fleet_simulator import wait_for
from tests.mqtt_broker import MosquittoBroker, connect, mosquitto_broker  # noqa: F401

pytest_plugins = ("tests.postgres",)

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
TEMPLATES = window_templates(8)
MODEL = TEMPLATES[0].model


def _window(seq: int, *, model: str = MODEL) -> TelemetryWindow:
    t0 = 1_800_000_000 + seq * 60
    return replace(TEMPLATES[seq % len(TEMPLATES)], seq=seq, t0=t0, t1=t0 + 60, model=model)


def _incoming(device_id: str, seq: int, at: datetime = NOW, model: str = MODEL) -> IncomingWindow:
    window = _window(seq, model=model)
    return IncomingWindow(device_id, window, json.loads(encode_window(window)), at)


def test_a_batch_stores_each_window_once_and_counts_duplicates(db_url: str) -> None:
    engine = open_database(db_url)
    store = TelemetryStore(engine)
    first = store.add_windows([_incoming("cam-1", 1), _incoming("cam-1", 2)])
    assert [w.window.seq for w in first.stored] == [1, 2] and first.duplicates == 0

    later = NOW + timedelta(minutes=1)
    batch = [
        _incoming("cam-1", 2, later),  # stored before
        _incoming("cam-1", 4, later, "m@2"),
        _incoming("cam-1", 3, later),  # lower seq after a higher one: model stays m@2
        _incoming("cam-2", 1, later),
        _incoming("cam-2", 1, later),  # twice in one batch
    ]
    result = store.add_windows(batch)
    assert [(w.device_id, w.window.seq) for w in result.stored] == [
        ("cam-1", 4),
        ("cam-1", 3),
        ("cam-2", 1),
    ]
    assert result.duplicates == 2
    assert store.count_windows() == 5 and store.count_windows("cam-2") == 1
    cam1, cam2 = store.device("cam-1"), store.device("cam-2")
    assert cam1 is not None and (cam1.model, cam1.last_seen) == ("m@2", later)
    assert cam2 is not None and (cam2.status, cam2.model) == ("unknown", MODEL)

    only_duplicates = store.add_windows(batch)
    assert only_duplicates.stored == () and only_duplicates.duplicates == 5
    assert store.add_windows([]) == type(result)((), 0)

    # Tailing: every window in storage order, then nothing new.
    tailed, last = store.windows_after(0, 100)
    assert [(w.device_id, w.window.seq) for w in tailed] == [
        ("cam-1", 1),
        ("cam-1", 2),
        ("cam-1", 4),
        ("cam-1", 3),
        ("cam-2", 1),
    ]
    assert tailed[2].window == _window(4, model="m@2") and last == store.last_window_id()
    assert store.windows_after(last, 100) == ([], last)
    engine.dispose()


def test_a_failing_batch_stores_nothing(db_url: str) -> None:
    engine = open_database(db_url)
    store = TelemetryStore(engine)
    assert store.add_windows([_incoming("cam-1", 1)]).stored
    with engine.begin() as connection:  # a broken database: the windows table is gone
        connection.execute(text("ALTER TABLE telemetry_windows RENAME TO gone"))
    with pytest.raises(StorageError, match="storing 2 windows"):
        store.add_windows([_incoming("cam-1", 2), _incoming("cam-9", 1)])
    # The devices inserted in the same transaction were rolled back with it.
    assert [d.id for d in store.devices()] == ["cam-1"]
    engine.dispose()


def _publish(publisher: MqttTransport, device_id: str, window: TelemetryWindow) -> None:
    assert publisher.publish(topics.telemetry(device_id), encode_window(window), qos=1)


def test_ingest_stores_in_batches_and_keeps_states_in_arrival_order(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    engine = open_database(str(tmp_path / "fleet.db"))
    store = TelemetryStore(engine)
    transport = MqttTransport(host=mosquitto.host, port=mosquitto.port, client_id="ingest")
    ingest = TelemetryIngest(transport, store, share=None, batch_size=100, batch_wait_s=0.2)
    publisher = connect(mosquitto, "devices")
    ingest.start()
    transport.start()
    try:
        assert transport.wait_connected(5)
        for seq in range(1, 31):
            for d in range(10):
                _publish(publisher, f"cam-{d}", _window(seq))
        # A window of the old model, then the state naming a new one: the state wins,
        # and the old model is kept as the previous one.
        _publish(publisher, "cam-0", _window(31, model="line-model@1"))
        state = DeviceState(Status.ONLINE, ts=1, model="line-model@2", line="line-a")
        assert publisher.publish(topics.state("cam-0"), encode_state(state), qos=1)
        assert publisher.publish(topics.telemetry("cam-1"), b"{not json", qos=1)
        assert wait_for(lambda: ingest.counters().states == 1, 15)
        assert ingest.wait_idle(10)
        counters = ingest.counters()
        assert (counters.windows, counters.duplicates, counters.rejected) == (301, 0, 1)
        # 301 windows in far fewer transactions than windows.
        assert counters.batches <= 301 // 10, counters
        assert store.count_windows() == 301
        cam0 = store.device("cam-0")
        assert cam0 is not None and (cam0.model, cam0.line) == ("line-model@2", "line-a")
    finally:
        transport.stop()
        ingest.stop()
        publisher.stop()
        engine.dispose()


def _feed_rig(
    tmp_path: Path, coalesce_after: int
) -> tuple[TelemetryStore, FleetDriftMonitor, DriftFeed]:
    engine = open_database(str(tmp_path / f"fleet-{coalesce_after}.db"))
    store = TelemetryStore(engine)
    monitor = FleetDriftMonitor(
        store, AlertStore(engine), ReferenceLibrary(bundle_dirs=[ONNX_BUNDLE])
    )
    feed = DriftFeed(
        store, monitor, reorder_wait_s=0.5, coalesce_after=coalesce_after, poll_s=0.02, batch=64
    )
    return store, monitor, feed


@pytest.mark.parametrize("coalesce_after", [1_000, 1])
def test_drift_feed_feeds_stored_windows_in_seq_order(tmp_path: Path, coalesce_after: int) -> None:
    store, monitor, feed = _feed_rig(tmp_path, coalesce_after)
    store.add_windows([_incoming("cam-1", 1), _incoming("cam-2", 1)])
    feed.start(replay=10)  # the stored windows are replayed, not fed again
    assert monitor.fed == 2
    try:
        # Stored out of order (two ingest workers racing): fed in order.
        store.add_windows([_incoming("cam-1", 3), _incoming("cam-2", 2)])
        store.add_windows([_incoming("cam-1", 2)])
        assert feed.wait_caught_up(10)
        reports = {r.device: r.seq for r in monitor.reports()}
        assert reports == {"cam-1": 3, "cam-2": 2} and monitor.fed == 5
        # A gap that never fills is given up after reorder_wait_s; the window arriving
        # after that is late: stored, not fed.
        store.add_windows([_incoming("cam-1", 5)])
        assert wait_for(lambda: {r.device: r.seq for r in monitor.reports()}["cam-1"] == 5, 10)
        store.add_windows([_incoming("cam-1", 4)])
        assert wait_for(lambda: feed.counters().late == 1, 10)
        # Many windows at once: in one batch, decided once when coalescing.
        store.add_windows([_incoming(f"cam-{d}", s) for s in (6, 7) for d in (1, 2)])
        assert feed.wait_caught_up(10)
        counters = feed.counters()
        assert counters.fed == 3 + 1 + 4 and counters.errors == 0
        assert (counters.coalesced > 0) == (coalesce_after == 1)
        assert {r.device: r.seq for r in monitor.reports()} == {"cam-1": 7, "cam-2": 7}
        assert feed.lag().windows == 0
    finally:
        feed.stop()
