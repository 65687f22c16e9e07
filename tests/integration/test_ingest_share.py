"""Two ingest workers on one shared subscription against a real Mosquitto and one real
SQLite file: the broker splits the windows between them, every window is stored exactly
once, a republished window is ignored and counted, and one drift feed reading the
database sees every device's windows in seq order whichever worker stored them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from edge_agent.protocol import topics
from edge_agent.protocol.telemetry import encode_window
from edge_agent.transport import MqttTransport
from fleet_server.storage import AlertStore, TelemetryStore, open_database
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import TelemetryWindowRow
from fleet_server.workers.drift_feed import DriftFeed
from fleet_server.workers.drift_monitor import FleetDriftMonitor
from fleet_server.workers.ingest import IngestCounters, TelemetryIngest
from fleet_server.workers.references import ReferenceLibrary
from hil.bench_windows import ONNX_BUNDLE, window_templates
from hil.ingest_bench import FLEET_SERVER
from tests.fleet_simulator import wait_for
from tests.mqtt_broker import MosquittoBroker, connect, mosquitto_broker  # noqa: F401

DEVICES = [f"cam-{d:02d}" for d in range(10)]
ROUNDS = 30
TOTAL = len(DEVICES) * ROUNDS


@dataclass
class Worker:
    transport: MqttTransport
    ingest: TelemetryIngest
    engine: Engine

    def counters(self) -> IngestCounters:
        return self.ingest.counters()


@pytest.fixture
def messages() -> list[tuple[str, bytes]]:
    templates = window_templates(8)
    out = []
    for seq in range(1, ROUNDS + 1):
        for k, device in enumerate(DEVICES):
            window = replace(templates[(seq + k) % 8], seq=seq, t0=seq * 60, t1=seq * 60 + 60)
            out.append((topics.telemetry(device), encode_window(window)))
    return out


def _workers(
    broker: MosquittoBroker, db: Path, share: str | None, stack: ExitStack
) -> list[Worker]:
    workers = []
    for k in range(2):
        # Each worker as its own process would be: its own engine and connection.
        engine = open_database(str(db))
        stack.callback(engine.dispose)
        transport = MqttTransport(host=broker.host, port=broker.port, client_id=f"ingest-{k}")
        ingest = TelemetryIngest(
            transport, TelemetryStore(engine), share=share, batch_size=20, batch_wait_s=0.02
        )
        ingest.start()
        stack.callback(ingest.stop)
        transport.start()
        stack.callback(transport.stop)
        assert transport.wait_connected(5)
        workers.append(Worker(transport, ingest, engine))
    return workers


def _handled(workers: list[Worker]) -> int:
    return sum(w.counters().windows + w.counters().duplicates for w in workers)


def _publish_all(publisher: MqttTransport, messages: list[tuple[str, bytes]]) -> None:
    for topic, payload in messages:
        assert publisher.publish(topic, payload, qos=1)


def _stored_pairs(engine: Engine) -> tuple[int, int]:
    """(rows, distinct (device, seq)) in the windows table."""
    with Transaction(session_factory(engine)(), "counting") as session:
        rows = session.scalar(select(func.count(TelemetryWindowRow.id)))
        distinct = session.scalar(
            select(func.count()).select_from(
                select(TelemetryWindowRow.device_id, TelemetryWindowRow.seq).distinct().subquery()
            )
        )
    return int(rows or 0), int(distinct or 0)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def test_two_workers_split_a_shared_subscription_and_store_each_window_once(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    messages: list[tuple[str, bytes]],
    stack: ExitStack,
) -> None:
    db = tmp_path / "fleet.db"
    workers = _workers(mosquitto, db, "fleet", stack)
    engine = workers[0].engine
    store = TelemetryStore(engine)
    monitor = FleetDriftMonitor(
        store, AlertStore(engine), ReferenceLibrary(bundle_dirs=[ONNX_BUNDLE])
    )
    feed = DriftFeed(store, monitor, reorder_wait_s=5.0, poll_s=0.02, batch=50)
    feed.start(replay=10)
    stack.callback(feed.stop)
    publisher = connect(mosquitto, "devices")
    stack.callback(publisher.stop)

    _publish_all(publisher, messages)
    assert wait_for(lambda: _handled(workers) >= TOTAL, 20), [w.counters() for w in workers]
    assert all(w.ingest.wait_idle(10) for w in workers)
    first, second = (w.counters() for w in workers)
    # Each window went to one worker only, and both got a share of them.
    assert first.windows + second.windows == TOTAL
    assert first.duplicates + second.duplicates == 0
    assert first.windows > 0 and second.windows > 0, (first, second)
    assert _stored_pairs(engine) == (TOTAL, TOTAL)

    # One drift feed over the database sees every window, each device's in seq order.
    assert feed.wait_caught_up(20)
    assert feed.counters().late == 0 and feed.counters().fed == TOTAL
    assert {r.device: r.seq for r in monitor.reports()} == dict.fromkeys(DEVICES, ROUNDS)

    # Devices resend what they spooled: ignored and counted, whichever worker gets it.
    _publish_all(publisher, messages[: TOTAL // 2])
    assert wait_for(lambda: _handled(workers) >= TOTAL + TOTAL // 2, 20)
    assert all(w.ingest.wait_idle(10) for w in workers)
    counters = [w.counters() for w in workers]
    assert sum(c.windows for c in counters) == TOTAL
    assert sum(c.duplicates for c in counters) == TOTAL // 2
    assert _stored_pairs(engine) == (TOTAL, TOTAL)


def test_without_a_share_both_workers_get_every_window_and_one_stores_it(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    messages: list[tuple[str, bytes]],
    stack: ExitStack,
) -> None:
    workers = _workers(mosquitto, tmp_path / "fleet.db", None, stack)
    publisher = connect(mosquitto, "devices")
    stack.callback(publisher.stop)
    _publish_all(publisher, messages)
    assert wait_for(lambda: _handled(workers) >= 2 * TOTAL, 20)
    counters = [w.counters() for w in workers]
    assert sum(c.windows for c in counters) == TOTAL
    assert sum(c.duplicates for c in counters) == TOTAL
    assert _stored_pairs(workers[0].engine) == (TOTAL, TOTAL)


def test_ingest_command_documents_and_checks_the_share_option(tmp_path: Path) -> None:
    shown = subprocess.run(
        [str(FLEET_SERVER), "ingest", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--share GROUP" in shown and "--batch N" in shown and "--no-drift" in shown
    args = ["--broker", "127.0.0.1:1", "--db", "x.db", "--no-drift", "--share", "fleet/a"]
    refused = subprocess.run(
        [str(FLEET_SERVER), "ingest", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert refused.returncode == 2 and "a group name has no '/'" in refused.stderr
