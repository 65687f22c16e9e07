"""Opening the fleet server's database: any SQLAlchemy URL, SQLite in WAL mode by default.

``open_database("sqlite:///fleet.db")`` (or a plain path, taken as a SQLite file) returns
an Engine whose schema is at the newest migration (``migrate.upgrade_database``: a new
database gets every table, an older one is upgraded in place, an up-to-date one costs a
single read of its revision). PostgreSQL by URL: ``postgresql+psycopg://...``. SQLite
connections get ``journal_mode=WAL`` (readers never block the ingest writer),
``synchronous=NORMAL`` (durable at each checkpoint, which WAL makes safe),
``foreign_keys=ON`` and a busy timeout, so the webhook thread and the ingest thread can
both write. PostgreSQL and others are used as SQLAlchemy configures them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 10_000


class StorageError(Exception):
    """The database cannot be opened or used; the message names the URL (no password)."""


def database_url(text: str) -> str:
    """``text`` if it is a URL (has ``://``), else a SQLite URL for the file path ``text``.

    Raises:
        StorageError: empty text.
    """
    if not text:
        raise StorageError("empty database URL")
    return text if "://" in text else f"sqlite:///{text}"


def open_database(url: str, *, echo: bool = False) -> Engine:
    """An engine for ``url`` with the schema at the newest migration.

    Several processes may open one database at once: only one of them migrates it.

    Raises:
        StorageError: an invalid URL, a missing driver, a database that cannot be
            opened or written, or one at a schema revision this version does not know.
    """
    # migrate imports StorageError from this module.
    from fleet_server.storage.migrate import upgrade_database

    engine = connect_database(url, echo=echo)
    try:
        upgrade_database(engine)
    except StorageError as e:
        engine.dispose()
        # The migration's message names the URL already.
        raise StorageError(f"cannot open database: {e}") from e
    return engine


def connect_database(url: str, *, echo: bool = False) -> Engine:
    """An engine for ``url`` as ``open_database`` configures it, without touching the
    schema (for reading or changing the schema revision itself).

    Raises:
        StorageError: an invalid URL or a missing driver.
    """
    try:
        engine = create_engine(database_url(url), echo=echo)
    except (ArgumentError, ImportError) as e:
        raise StorageError(f"invalid database URL {url!r}: {e}") from e
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


class Transaction:
    """``with`` block: commit on success, roll back and raise StorageError on a
    database error (the cause kept), always close."""

    def __init__(self, session: Session, what: str) -> None:
        self._session = session
        self._what = what

    def __enter__(self) -> Session:
        return self._session

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: object
    ) -> None:
        try:
            if exc is None:
                try:
                    self._session.commit()
                except SQLAlchemyError as e:
                    self._session.rollback()
                    raise StorageError(f"{self._what}: {e}") from e
            else:
                self._session.rollback()
                if isinstance(exc, SQLAlchemyError):
                    raise StorageError(f"{self._what}: {exc}") from exc
        finally:
            self._session.close()
