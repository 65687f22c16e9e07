"""Schema migrations of the fleet database (Alembic), run from code: no alembic.ini.

``upgrade_database(engine)`` brings a database to the newest revision. It first reads the
stored revision without taking any lock, so opening an up-to-date database (every start
of every server and ingest process) costs one small read. Only a database that is behind
is migrated, inside one transaction that holds the migration lock: PostgreSQL's
transaction-scoped advisory lock, or SQLite's write lock (``BEGIN IMMEDIATE``). The
revision is read again under the lock, so processes starting together migrate once.

A database made before migrations existed (``create_all`` of the first release: the
tables ``devices``, ``telemetry_windows`` and ``alerts``, and no ``alembic_version``) is
stamped ``0001`` and then upgraded in place.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, MetaData, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.storage.database import StorageError
from fleet_server.storage.schema import Base

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The revision whose tables ``create_all`` made before migrations existed.
BASELINE_REVISION = "0001"
BASELINE_TABLES = frozenset({"devices", "telemetry_windows", "alerts"})
# One PostgreSQL advisory lock key for "migrating the fleet schema" (a signed 64-bit int).
PG_MIGRATION_LOCK_KEY = zlib.crc32(b"edgefleet schema migration")
# Alembic's ``context`` and ``op`` are module-level proxies: one migration per process
# at a time, whatever the engine.
_PROCESS_LOCK = threading.Lock()


def migration_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the packaged migrations, bound to ``connection`` if given
    (``env.py`` runs on it)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(migration_config())


def head_revision() -> str:
    """The newest revision this version of the fleet server knows."""
    head = _scripts().get_current_head()
    if head is None:
        raise RuntimeError(f"no migration revisions in {MIGRATIONS_DIR}")
    return head


def known_revisions() -> list[str]:
    """Every revision, oldest first."""
    return [script.revision for script in reversed(list(_scripts().walk_revisions()))]


def current_revision(engine: Engine) -> str | None:
    """The database's revision; None for a database that has never been migrated.

    Raises:
        StorageError: the database cannot be read (the message names the URL).
    """
    try:
        with engine.connect() as connection:
            return _read_revision(connection)
    except SQLAlchemyError as e:
        raise StorageError(f"cannot read the schema revision of {_shown(engine)}: {e}") from e


def upgrade_database(engine: Engine, revision: str = "head") -> str:
    """Migrate the database to ``revision`` (default the newest); returns the revision
    it is at afterwards. Cheap when the database is already at the newest revision.

    Raises:
        StorageError: the database is at a revision this version does not know (a newer
            fleet server migrated it), holds fleet tables without a revision that are not
            the first release's, ``revision`` is unknown, or a migration step failed (the
            transaction is rolled back; the message names the URL and revision).
    """
    target = head_revision() if revision == "head" else revision
    _check_target(target)
    current = current_revision(engine)
    if current == target:
        return current
    _check_known(engine, current)
    with _PROCESS_LOCK, _migration_connection(engine, f"migrate to {target}") as connection:
        current = _read_revision(connection)
        _check_known(engine, current)
        if current is None and _is_baseline(engine, connection):
            command.stamp(migration_config(connection), BASELINE_REVISION)
            current = BASELINE_REVISION
        if current != target:
            command.upgrade(migration_config(connection), target)
        return target


def downgrade_database(engine: Engine, revision: str) -> str:
    """Migrate the database back to ``revision`` (an older fleet server's schema; the
    tables and columns added since are dropped with their data); returns ``revision``.

    Raises:
        StorageError: an unknown revision, a database at an unknown revision, or a
            failed step (rolled back).
    """
    _check_target(revision)
    with _PROCESS_LOCK, _migration_connection(engine, f"downgrade to {revision}") as connection:
        _check_known(engine, _read_revision(connection))
        command.downgrade(migration_config(connection), revision)
    return revision


def stamp_database(engine: Engine, revision: str) -> None:
    """Record ``revision`` as the database's revision without running any migration
    (for a database whose tables an operator has checked by hand).

    Raises:
        StorageError: an unknown revision, or the database failed.
    """
    _check_target(revision)
    with _PROCESS_LOCK, _migration_connection(engine, f"stamp {revision}") as connection:
        command.stamp(migration_config(connection), revision, purge=True)


def schema_differences(engine: Engine, metadata: MetaData | None = None) -> list[Any]:
    """What Alembic finds different between the database and ``metadata`` (default
    ``Base.metadata``; empty when every schema change has its migration):
    ``alembic.autogenerate`` diff tuples such as ``("add_column", None, table, column)``.

    Raises:
        StorageError: the database cannot be read.
    """
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, metadata or Base.metadata))
    except SQLAlchemyError as e:
        raise StorageError(f"cannot compare the schema of {_shown(engine)}: {e}") from e


def _read_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _check_known(engine: Engine, revision: str | None) -> None:
    if revision is None or revision in known_revisions():
        return
    raise StorageError(
        f"database {_shown(engine)} is at schema revision {revision!r}, which this fleet "
        f"server does not know (known: {', '.join(known_revisions())}); a newer fleet "
        "server migrated it, or the revision is mistyped"
    )


def _check_target(revision: str) -> None:
    if revision not in known_revisions():
        raise StorageError(
            f"unknown schema revision {revision!r} (known: {', '.join(known_revisions())})"
        )


def _is_baseline(engine: Engine, connection: Connection) -> bool:
    """True for the first release's tables made without migrations; False for an empty
    database (or one holding only other applications' tables)."""
    inspector = inspect(connection)
    found = set(inspector.get_table_names()) & set(Base.metadata.tables)
    if not found:
        return False
    columns = {c["name"] for c in inspector.get_columns("devices")} if "devices" in found else ()
    if found == BASELINE_TABLES and "site" not in columns:
        return True
    raise StorageError(
        f"database {_shown(engine)} has fleet tables ({', '.join(sorted(found))}) but no "
        "schema revision, and they are not the first release's tables; compare them with "
        "this version's schema and record the matching revision with "
        "'fleet-server db stamp REVISION --db URL'"
    )


@contextmanager
def _migration_connection(engine: Engine, what: str) -> Iterator[Connection]:
    """A connection inside a transaction that holds the migration lock; committed when
    the block ends, rolled back on any error (SQLAlchemy and Alembic errors become
    StorageError naming the URL)."""
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                with _sqlite_write_transaction(connection):
                    yield connection
            else:
                with connection.begin():
                    if engine.dialect.name == "postgresql":
                        connection.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"),
                            {"key": PG_MIGRATION_LOCK_KEY},
                        )
                    yield connection
    except (SQLAlchemyError, CommandError) as e:
        raise StorageError(f"cannot {what} database {_shown(engine)}: {e}") from e


@contextmanager
def _sqlite_write_transaction(connection: Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE (the write lock, waiting up to the busy timeout) with foreign
    keys off while tables are rebuilt, checked before COMMIT.

    The sqlite3 module issues BEGIN only before DML, so DDL would commit one statement
    at a time: the driver is put in autocommit mode and the transaction is explicit.
    """
    dbapi = connection.connection.dbapi_connection
    if dbapi is None:
        raise RuntimeError("the SQLite connection is closed")
    before = dbapi.isolation_level
    dbapi.isolation_level = None
    try:
        # PRAGMA foreign_keys is a no-op inside a transaction: switch it before BEGIN.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise StorageError(
                    f"migrating {_shown(connection.engine)} broke foreign keys: {broken[:5]}"
                )
            connection.exec_driver_sql("COMMIT")
        except BaseException:
            if dbapi.in_transaction:
                connection.exec_driver_sql("ROLLBACK")
            raise
    finally:
        # The connection goes back to the pool as it came: foreign keys on.
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        connection.rollback()  # SQLAlchemy's own (empty) transaction from autobegin
        dbapi.isolation_level = before


def _shown(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
