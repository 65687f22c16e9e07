"""The fleet database (fleet_server.storage) on a real SQLite file and a real PostgreSQL
server (every test taking ``engine`` runs on both)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from edge_agent.protocol.state import DeviceState, Status
from edge_agent.protocol.telemetry import Moments, TelemetryWindow, encode_window
from fleet_server.domain.alerts import OpenAlert, QuietAlert, RenewAlert, ResolveAlert
from fleet_server.domain.fleet_drift import AlertKey, DeviceFinding, Drift
from fleet_server.storage import (
    AlertStore,
    StorageError,
    TelemetryStore,
    database_url,
    open_database,
)

pytest_plugins = ("tests.postgres",)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
LONE = AlertKey("device", "cam-3", "brightness", "down")
FLEET = AlertKey("fleet", "*", "brightness", "down")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = open_database(db_url)
    yield engine
    engine.dispose()


def _window(seq: int) -> tuple[TelemetryWindow, dict[str, object]]:
    window = TelemetryWindow(
        seq=seq,
        t0=1_800_000_000 + 60 * seq,
        t1=1_800_000_060 + 60 * seq,
        model="m@1",
        edge="0.1.0",
        ref="0123456789abcdef",
        counts={"pass": 90, "fail": 10, "uncertain": 0, "error": 0, "dropped": 0},
        moments={"brightness": Moments(100, 12000.5, 1440100.25)},
    )
    return window, json.loads(encode_window(window))


def _drift(key: AlertKey, since: int, covers: tuple[AlertKey, ...] = ()) -> Drift:
    finding = DeviceFinding("brightness", "cusum", "down", 8.0, 5.0, -3.0, None, True, since, 1000)
    return Drift(key, ("cam-3",), 1, (("cam-3", (finding,)),), covers)


def test_sqlite_runs_in_wal_mode_and_plain_paths_are_sqlite_files(tmp_path: Path) -> None:
    engine = open_database(str(tmp_path / "fleet.db"))
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    assert database_url("fleet.db") == "sqlite:///fleet.db"
    assert database_url("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(StorageError, match="invalid database URL 'nosuch://x'"):
        open_database("nosuch://x")
    with pytest.raises(StorageError, match="cannot open database"):
        open_database(str(tmp_path / "no" / "such" / "dir" / "fleet.db"))


def test_a_window_is_stored_once_per_device_and_seq(engine: Engine) -> None:
    store = TelemetryStore(engine)
    window, document = _window(1)
    assert store.add_window("cam-1", window, document, NOW)
    assert not store.add_window("cam-1", window, document, NOW + timedelta(seconds=5))
    assert store.add_window("cam-2", window, document, NOW)
    assert store.count_windows() == 2 and store.count_windows("cam-1") == 1
    device = store.device("cam-1")
    assert device is not None and device.model == "m@1" and device.status == "unknown"


def test_state_messages_update_the_device_row(engine: Engine) -> None:
    store = TelemetryStore(engine)
    state = DeviceState(Status.ONLINE, ts=5, model="m@1", profile="rpi5", line="l1", drift=("x",))
    store.record_state("cam-1", state, NOW)
    store.record_state("cam-1", DeviceState(Status.OFFLINE), NOW + timedelta(minutes=1))
    (device,) = store.devices()
    assert (device.status, device.line, device.profile) == ("offline", "l1", "rpi5")
    assert device.drift == ()
    assert device.last_seen == NOW + timedelta(minutes=1)
    assert device.last_seen.tzinfo is not None


def test_replay_gives_the_last_windows_per_device_in_seq_order(engine: Engine) -> None:
    store = TelemetryStore(engine)
    for seq in (3, 1, 2, 5, 4):
        window, document = _window(seq)
        store.add_window("cam-1", window, document, NOW)
    replayed = list(store.replay(per_device=3))
    assert [w.window.seq for w in replayed] == [3, 4, 5]
    assert replayed[0].window == _window(3)[0]  # floats come back exactly


def test_alert_lifecycle_is_written_and_read_back(engine: Engine) -> None:
    alerts = AlertStore(engine)

    def evidence(drift: Drift) -> dict[str, object]:
        return {"devices": list(drift.devices)}

    opened, _ = alerts.apply([OpenAlert(_drift(LONE, 4))], evidence, NOW, webhook=True)
    (lone_id,) = opened
    record = alerts.get(lone_id)
    assert record.key == LONE and record.since_seq == 4 and record.test == "cusum"
    assert record.webhook_status == "pending" and record.webhook_event == "alert.opened"
    # A renewal keeps the start of the drift; quiet counts are written.
    later = NOW + timedelta(minutes=1)
    alerts.apply([RenewAlert(lone_id, _drift(LONE, 6))], evidence, later, webhook=True)
    alerts.apply([QuietAlert(lone_id, 2)], evidence, later, webhook=True)
    record = alerts.get(lone_id)
    assert record.since_seq == 4 and record.quiet == 2 and record.updated_at == later
    assert [a.quiet for a in alerts.active()] == [2]
    # A fleet alert opens and folds the device alert into itself in one transaction.
    opened, resolved = alerts.apply(
        [OpenAlert(_drift(FLEET, 7, covers=(LONE,))), ResolveAlert(lone_id, FLEET)],
        evidence,
        later,
        webhook=False,
    )
    assert resolved == [lone_id]
    record = alerts.get(lone_id)
    assert record.superseded_by == opened[0] and record.resolved_at == later
    assert [a.key for a in alerts.active()] == [FLEET]
    document = alerts.get(opened[0]).document()
    assert document["scope"] == "fleet" and document["since"] == {
        "seq": 7,
        "t": "1970-01-01T00:16:40+00:00",
    }
    alerts.record_delivery(lone_id, "failed", 4, "POST http://x: refused", later)
    assert alerts.get(lone_id).webhook_error == "POST http://x: refused"
    with pytest.raises(ValueError, match="unknown webhook status 'lost'"):
        alerts.record_delivery(lone_id, "lost", 1, None, later)
    with pytest.raises(KeyError, match="no alert 99"):
        alerts.get(99)


def test_the_database_refuses_two_open_alerts_on_one_key(engine: Engine) -> None:
    alerts = AlertStore(engine)
    alerts.apply([OpenAlert(_drift(LONE, 4))], lambda d: {}, NOW, webhook=False)
    with pytest.raises(StorageError, match="writing alerts"):
        alerts.apply([OpenAlert(_drift(LONE, 5))], lambda d: {}, NOW, webhook=False)


def test_seqs_from_millisecond_clocks_are_stored_whole(engine: Engine) -> None:
    # An agent's first seq is its clock in milliseconds: beyond 32 bits.
    seq = 1_795_000_000_123
    store = TelemetryStore(engine)
    window, document = _window(seq)
    assert store.add_window("cam-1", window, document, NOW)
    assert not store.add_window("cam-1", window, document, NOW)
    (replayed,) = store.replay(per_device=1)
    assert (replayed.window.seq, replayed.window.t1) == (seq, window.t1)
    alerts = AlertStore(engine)
    (alert_id,), _ = alerts.apply([OpenAlert(_drift(LONE, seq))], lambda d: {}, NOW, webhook=False)
    assert alerts.get(alert_id).since_seq == seq
