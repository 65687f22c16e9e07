"""Schema migrations (fleet_server.storage.migrate) on SQLite and a real PostgreSQL.

The schema check here is what catches a change to ``schema.py`` without its migration:
a database migrated to the newest revision must match ``Base.metadata`` exactly.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import BigInteger, Column, Connection, Engine, MetaData, String, inspect, text
from sqlalchemy.exc import DBAPIError

from fleet_server.db_cli import add_db_commands
from fleet_server.storage import StorageError, TelemetryStore, open_database
from fleet_server.storage.database import connect_database
from fleet_server.storage.migrate import (
    BASELINE_REVISION,
    PG_MIGRATION_LOCK_KEY,
    current_revision,
    downgrade_database,
    head_revision,
    known_revisions,
    schema_differences,
    stamp_database,
    upgrade_database,
)
from fleet_server.storage.schema import Base

pytest_plugins = ("tests.postgres",)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
MS_SEQ = 1_795_000_000_123  # an agent's first seq: its clock in milliseconds

# What ``Base.metadata.create_all`` emitted for the first release (before migrations),
# with the two spellings that differ between SQLite and PostgreSQL as placeholders.
FIRST_RELEASE_DDL = """
CREATE TABLE alerts (
    id {serial} NOT NULL, scope VARCHAR(16) NOT NULL, scope_key VARCHAR(96) NOT NULL,
    feature VARCHAR(32) NOT NULL, test VARCHAR(32) NOT NULL, direction VARCHAR(16) NOT NULL,
    effect FLOAT, statistic FLOAT NOT NULL, threshold FLOAT NOT NULL, p_value FLOAT,
    since_seq INTEGER NOT NULL, since_t {time} NOT NULL, devices JSON NOT NULL,
    evidence JSON NOT NULL, opened_at {time} NOT NULL, updated_at {time} NOT NULL,
    resolved_at {time}, superseded_by INTEGER, quiet INTEGER NOT NULL,
    webhook_status VARCHAR(16) NOT NULL, webhook_event VARCHAR(32),
    webhook_attempts INTEGER NOT NULL, webhook_error VARCHAR(400), webhook_at {time},
    PRIMARY KEY (id), FOREIGN KEY(superseded_by) REFERENCES alerts (id)
);
CREATE INDEX ix_alerts_opened_at ON alerts (opened_at);
CREATE INDEX ix_alerts_resolved_at ON alerts (resolved_at);
CREATE UNIQUE INDEX ux_alerts_open_key ON alerts (scope, scope_key, feature, direction)
    WHERE resolved_at IS NULL;
CREATE TABLE devices (
    id VARCHAR(64) NOT NULL, line VARCHAR(96), profile VARCHAR(96), model VARCHAR(96),
    edge_version VARCHAR(96), status VARCHAR(16) NOT NULL, drift JSON NOT NULL,
    spool_queued INTEGER, spool_dropped INTEGER, state_ts INTEGER,
    first_seen {time} NOT NULL, last_seen {time} NOT NULL, PRIMARY KEY (id)
);
CREATE INDEX ix_devices_line ON devices (line);
CREATE INDEX ix_devices_model ON devices (model);
CREATE INDEX ix_devices_profile ON devices (profile);
CREATE TABLE telemetry_windows (
    id {serial} NOT NULL, device_id VARCHAR(64) NOT NULL, seq INTEGER NOT NULL,
    model VARCHAR(96) NOT NULL, ref VARCHAR(32) NOT NULL, t0 INTEGER NOT NULL,
    t1 INTEGER NOT NULL, frames INTEGER NOT NULL, "window" JSON NOT NULL,
    received_at {time} NOT NULL, PRIMARY KEY (id),
    CONSTRAINT uq_window_device_seq UNIQUE (device_id, seq),
    FOREIGN KEY(device_id) REFERENCES devices (id)
);
CREATE INDEX ix_telemetry_windows_device_id ON telemetry_windows (device_id);
CREATE INDEX ix_telemetry_windows_model ON telemetry_windows (model);
CREATE INDEX ix_telemetry_windows_received_at ON telemetry_windows (received_at);
CREATE INDEX ix_telemetry_windows_t1 ON telemetry_windows (t1);
"""
SPELLINGS = {
    "sqlite": {"serial": "INTEGER", "time": "DATETIME"},
    "postgresql": {"serial": "SERIAL", "time": "TIMESTAMP WITH TIME ZONE"},
}


@pytest.fixture
def bare(db_url: str) -> Iterator[Engine]:
    """An engine on the empty database, its schema untouched."""
    engine = connect_database(db_url)
    yield engine
    engine.dispose()


def _create_first_release_tables(engine: Engine) -> None:
    ddl = FIRST_RELEASE_DDL.format(**SPELLINGS[engine.dialect.name])
    with engine.begin() as connection:
        for statement in ddl.split(";"):
            if statement.strip():
                connection.exec_driver_sql(statement)


def _insert_first_release_rows(connection: Connection, seq: int) -> None:
    connection.execute(
        text(
            "INSERT INTO devices (id, line, status, drift, state_ts, first_seen, last_seen) "
            "VALUES ('cam-1', 'l1', 'online', '[]', 5, :t, :t)"
        ),
        {"t": NOW},
    )
    _insert_window(connection, seq)


def _insert_window(connection: Connection, seq: int) -> None:
    connection.execute(
        text(
            'INSERT INTO telemetry_windows (device_id, seq, model, ref, t0, t1, frames, "window",'
            " received_at) VALUES ('cam-1', :seq, 'm@1', 'r', 1, 2, 100, '{}', :t)"
        ),
        {"t": NOW, "seq": seq},
    )


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_a_new_database_is_migrated_to_exactly_the_schema(bare: Engine) -> None:
    assert current_revision(bare) is None
    assert upgrade_database(bare) == head_revision() == known_revisions()[-1]
    assert current_revision(bare) == head_revision()
    assert schema_differences(bare) == []
    assert _tables(bare) == set(Base.metadata.tables) | {"alembic_version"}


def test_the_schema_check_catches_a_schema_change_without_its_migration(bare: Engine) -> None:
    upgrade_database(bare)
    changed = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["devices"].append_column(Column("room", String(32)))
    changed.tables["telemetry_windows"].c.frames.type = BigInteger()
    kinds = {change[0] for change in _flatten(schema_differences(bare, changed))}
    assert kinds == {"add_column", "modify_type"}


def _flatten(differences: list[Any]) -> list[tuple[Any, ...]]:
    """Alembic nests column changes of one table in a list; one tuple per change."""
    flat: list[tuple[Any, ...]] = []
    for item in differences:
        flat.extend(item if isinstance(item, list) else [item])
    return flat


def test_the_first_revision_is_the_first_release_layout(bare: Engine) -> None:
    _create_first_release_tables(bare)
    first_release = MetaData()
    first_release.reflect(bare)
    first_release.drop_all(bare)
    assert upgrade_database(bare, BASELINE_REVISION) == BASELINE_REVISION
    assert _tables(bare) == {"devices", "telemetry_windows", "alerts", "alembic_version"}
    # Migrated 0001 against the reflected first-release tables: nothing differs.
    assert schema_differences(bare, first_release) == []


def test_a_database_from_before_migrations_is_upgraded_in_place(db_url: str) -> None:
    bare = connect_database(db_url)
    _create_first_release_tables(bare)
    with bare.begin() as connection:
        _insert_first_release_rows(connection, 7)
    if bare.dialect.name == "postgresql":
        # The first release's 32-bit seq could not hold a millisecond clock there.
        with pytest.raises(DBAPIError, match="out of range"), bare.begin() as connection:
            _insert_window(connection, MS_SEQ)
    bare.dispose()

    engine = open_database(db_url)
    try:
        assert current_revision(engine) == head_revision()
        assert schema_differences(engine) == []
        store = TelemetryStore(engine)
        device = store.device("cam-1")
        assert device is not None and device.line == "l1" and device.status == "online"
        assert store.count_windows("cam-1") == 1
        with engine.begin() as connection:
            row = connection.execute(text("SELECT site, previous_model FROM devices")).one()
            assert tuple(row) == (None, None)
            connection.execute(text("UPDATE telemetry_windows SET seq = :seq"), {"seq": MS_SEQ})
        with engine.connect() as connection:
            assert connection.execute(text("SELECT seq FROM telemetry_windows")).scalar() == MS_SEQ
    finally:
        engine.dispose()


def test_downgrade_returns_to_the_first_release_and_upgrade_comes_back(bare: Engine) -> None:
    upgrade_database(bare)
    with bare.begin() as connection:
        _insert_first_release_rows(connection, 3)
    assert downgrade_database(bare, BASELINE_REVISION) == BASELINE_REVISION
    assert _tables(bare) == {"devices", "telemetry_windows", "alerts", "alembic_version"}
    assert "site" not in {c["name"] for c in inspect(bare).get_columns("devices")}
    assert upgrade_database(bare) == head_revision()
    assert schema_differences(bare) == []
    with bare.connect() as connection:
        assert connection.execute(text("SELECT seq FROM telemetry_windows")).scalar() == 3


def test_a_failed_migration_leaves_the_database_as_it_was(bare: Engine) -> None:
    upgrade_database(bare, BASELINE_REVISION)
    with bare.begin() as connection:
        # In the way of revision 0002, after its first steps (devices gets a site).
        connection.exec_driver_sql("CREATE TABLE releases (id INTEGER PRIMARY KEY)")
    with pytest.raises(StorageError, match="cannot migrate to 0002 database") as raised:
        upgrade_database(bare)
    assert "releases" in str(raised.value)
    assert current_revision(bare) == BASELINE_REVISION
    assert "site" not in {c["name"] for c in inspect(bare).get_columns("devices")}
    with bare.connect() as connection:  # the connection went back to the pool intact
        if bare.dialect.name == "sqlite":
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_processes_and_threads_opening_a_new_database_together_migrate_it_once(
    db_url: str,
) -> None:
    code = "import sys; from fleet_server.storage import open_database; open_database(sys.argv[1])"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, db_url], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors: list[BaseException] = []

    def open_in_thread() -> None:
        try:
            open_database(db_url).dispose()
        except StorageError as e:
            errors.append(e)

    threads = [threading.Thread(target=open_in_thread) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for process in processes:
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
    assert errors == []
    engine = connect_database(db_url)
    try:
        with engine.connect() as connection:
            versions = connection.execute(text("SELECT version_num FROM alembic_version"))
            assert [v for (v,) in versions] == [head_revision()]
        assert schema_differences(engine) == []
    finally:
        engine.dispose()


def test_opening_an_up_to_date_database_waits_for_no_lock(db_url: str) -> None:
    open_database(db_url).dispose()
    holder = connect_database(db_url)
    opened = threading.Event()

    def reopen() -> None:
        open_database(db_url).dispose()
        opened.set()

    with holder.connect() as connection:
        # What a migrating process holds: the write lock or the advisory lock.
        if holder.dialect.name == "sqlite":
            connection.connection.dbapi_connection.isolation_level = None  # type: ignore[union-attr]
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_MIGRATION_LOCK_KEY})
        started = time.monotonic()
        thread = threading.Thread(target=reopen)
        thread.start()
        finished = opened.wait(timeout=5)
        waited = time.monotonic() - started
        if holder.dialect.name == "sqlite":
            connection.exec_driver_sql("ROLLBACK")
        else:
            connection.execute(text("SELECT pg_advisory_unlock_all()"))
        connection.rollback()
    thread.join(timeout=30)
    holder.dispose()
    assert finished, "opening an up-to-date database waited for the migration lock"
    assert waited < 2


def test_a_database_from_a_newer_server_is_refused(db_url: str) -> None:
    open_database(db_url).dispose()
    engine = connect_database(db_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    shown = engine.url.render_as_string(hide_password=True)
    with pytest.raises(StorageError, match="schema revision '0099'") as raised:
        open_database(db_url)
    assert shown in str(raised.value)


def test_fleet_tables_without_a_revision_and_not_the_first_release_are_refused(
    bare: Engine,
) -> None:
    Base.metadata.create_all(bare)
    with pytest.raises(StorageError, match=r"no schema revision.*db stamp"):
        upgrade_database(bare)
    stamp_database(bare, head_revision())
    assert current_revision(bare) == head_revision()
    assert schema_differences(bare) == []
    with pytest.raises(StorageError, match=r"unknown schema revision '0099' \(known: 0001, "):
        stamp_database(bare, "0099")


def _db_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fleet-server")
    add_db_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_db_commands_show_upgrade_and_stamp_the_revision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    head = head_revision()
    assert _db_command(["db", "current", "--db", url]) == 0
    assert capsys.readouterr().out == "none\n"
    assert _db_command(["db", "upgrade", "--db", url]) == 0
    assert capsys.readouterr().out == f"{url}: upgraded from none to {head} (head)\n"
    assert _db_command(["db", "upgrade", "--db", url]) == 0
    assert capsys.readouterr().out == f"{url}: already at {head} (head)\n"
    assert _db_command(["db", "stamp", BASELINE_REVISION, "--db", url]) == 0
    assert capsys.readouterr().out == f"{url}: stamped {BASELINE_REVISION}\n"
    assert _db_command(["db", "current", "--db", url]) == 0
    assert capsys.readouterr().out == f"{BASELINE_REVISION}\n"
    with pytest.raises(StorageError, match="invalid database URL 'nosuch://x'"):
        _db_command(["db", "current", "--db", "nosuch://x"])
    with pytest.raises(StorageError, match="unknown schema revision '7'"):
        _db_command(["db", "upgrade", "--db", url, "--revision", "7"])


def test_without_a_postgresql_server_the_tests_fail_naming_the_package(tmp_path: Path) -> None:
    # What the postgres_server fixture reports (as a failure, not a skip) on such a machine.
    # (Imported here: pytest loads tests.postgres as a plugin, with assertion rewriting.)
    from tests.postgres import find_bindir

    with pytest.raises(FileNotFoundError, match="install the Debian package `postgresql`"):
        find_bindir(debian_root=tmp_path, path=str(tmp_path))
    assert (find_bindir() / "initdb").exists()


def test_the_check_command_migrates_a_scratch_database_and_finds_no_difference(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fleet_server.storage.migrations.__main__ import main

    assert main(["check"]) == 0
    assert capsys.readouterr().out == "0 difference(s) from schema.py\n"
