"""Per-frame results kept on the device: one SQLite row per verdict, committed in batches.

Contract:

* ``results.db`` runs in WAL mode with ``synchronous=NORMAL``: a committed batch survives
  a crash of the process (SIGKILL, OOM kill); a power cut may lose the last commits but
  not the file's integrity.
* ``add`` buffers. A batch is committed in one transaction once it holds ``batch_rows``
  rows or its oldest row has waited ``batch_s`` (checked on ``add``; call ``flush`` when
  idle). ``add`` and ``flush`` return exactly the records that call committed, so a
  caller acknowledges a source only for rows that are on disk.
* A record whose ``source_key`` is already stored is skipped with a warning and still
  returned as committed, with ``id=None``: that key's verdict is on disk.
* Threads: the writer connection belongs to the thread that created the ``ResultsDB``
  (``add``, ``flush``, ``enforce_retention``, ``close``; sqlite3's default
  ``check_same_thread`` enforces it). Reads (``is_recorded``, ``recent``, ``count``) use a
  second connection behind a lock and may be called from any thread (the hot folder asks
  from its feeder thread); they see committed rows only.
* ``PRAGMA user_version`` is the schema version; ``_MIGRATIONS[n]`` upgrades n-1 to n.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DELETE_BATCH = 2000  # rows per retention transaction: milliseconds, never a long lock
OUTCOMES = frozenset({"pass", "fail", "uncertain", "error"})
_COLUMNS = "frame_id ts source source_key model p_defect verdict latency_ms error evidence id"
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE results (id INTEGER PRIMARY KEY, frame_id INTEGER NOT NULL,"
        " ts REAL NOT NULL, source TEXT NOT NULL, source_key TEXT, model TEXT NOT NULL,"
        " p_defect REAL, verdict TEXT NOT NULL, latency_ms REAL NOT NULL, error TEXT,"
        " evidence TEXT)",
        "CREATE INDEX results_ts ON results (ts)",
        "CREATE UNIQUE INDEX results_source_key ON results (source_key)"
        " WHERE source_key IS NOT NULL",
    ),
}
# Only a repeated source_key is skipped; any other constraint failure is an error.
_INSERT = (
    f"INSERT INTO results ({', '.join(_COLUMNS.split()[:-1])}) VALUES ({', '.join('?' * 10)})"
    " ON CONFLICT (source_key) WHERE source_key IS NOT NULL DO NOTHING"
)
_SELECT = f"SELECT {', '.join(_COLUMNS.split())} FROM results"
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


class ResultsDBError(Exception):
    """results.db cannot be opened, read or written. ``path`` names the file."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


class ResultsDBCorruptError(ResultsDBError):
    """The file is not a SQLite database, fails its integrity check, or is not ours."""


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """One verdict as stored; ``id`` is None until stored (and for skipped duplicates).

    Raises:
        ValueError: ``verdict`` is not an outcome, or ``ts`` / ``latency_ms`` not finite.
    """

    frame_id: int
    ts: float  # capture time, unix seconds
    source: str
    source_key: str | None
    model: str  # name@version
    p_defect: float | None
    verdict: str
    latency_ms: float
    error: str | None = None
    evidence: str | None = None  # evidence image path, relative to the evidence root
    id: int | None = None

    def __post_init__(self) -> None:
        if self.verdict not in OUTCOMES:
            raise ValueError(f"verdict {self.verdict!r} is not one of {sorted(OUTCOMES)}")
        if not (math.isfinite(self.ts) and math.isfinite(self.latency_ms)):
            raise ValueError("ts and latency_ms must be finite")


_Row = tuple[int, float, str, str | None, str, float | None, str, float, str | None, str | None]


def _values(r: ResultRecord) -> _Row:
    return (r.frame_id, r.ts, r.source, r.source_key, r.model, r.p_defect, r.verdict,
            r.latency_ms, r.error, r.evidence)  # fmt: skip


def _is_corruption(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    return "not a database" in str(e) or "malformed" in str(e)


class ResultsDB:
    """The results table of one device. See the module docstring for the contract."""

    def __init__(
        self,
        path: Path,
        *,
        max_age_s: float | None = 30 * 86400.0,
        max_rows: int | None = 1_000_000,
        batch_rows: int = 64,
        batch_s: float = 0.2,
        verify: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open, creating or migrating, the database at ``path``. ``verify`` runs
        ``PRAGMA quick_check`` (one read of the file) so corruption shows at start.

        Raises:
            ValueError: a limit is out of range.
            ResultsDBCorruptError: the file is corrupt or not a results database.
            ResultsDBError: the file cannot be opened, or its schema is newer than ours.
        """
        if batch_rows < 1 or batch_s < 0 or (max_rows is not None and max_rows < 1):
            raise ValueError("batch_rows and max_rows must be >= 1, batch_s >= 0")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError("max_age_s must be > 0")
        self.path = path
        self.max_age_s, self.max_rows = max_age_s, max_rows
        self.batch_rows, self.batch_s = batch_rows, batch_s
        self._clock = clock
        self._buffer: list[ResultRecord] = []
        self._oldest = 0.0  # clock time of the first buffered record
        self._read_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = sqlite3.connect(path, isolation_level=None)
            self._prepare(self._writer, verify)
            self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._reader.execute("PRAGMA query_only = ON")
        except (OSError, sqlite3.Error, ResultsDBError) as e:
            self._close_connections()
            if isinstance(e, sqlite3.Error):
                raise self._error("cannot open", e) from e
            if isinstance(e, OSError):
                raise ResultsDBError(path, f"cannot create directory: {e}") from e
            raise

    @classmethod
    def open_or_recover(
        cls,
        path: Path,
        *,
        max_age_s: float | None = 30 * 86400.0,
        max_rows: int | None = 1_000_000,
        batch_rows: int = 64,
        batch_s: float = 0.2,
    ) -> ResultsDB:
        """Open ``path``; if it is corrupt, move it and its -wal/-shm files aside as
        ``<name>.corrupt-<UTC time>``, log one error line and start a fresh database.

        Raises:
            ResultsDBError: not openable for another reason (permissions, newer schema),
                or the corrupt file cannot be moved aside.
        """

        def open_db() -> ResultsDB:
            return cls(
                path, max_age_s=max_age_s, max_rows=max_rows, batch_rows=batch_rows, batch_s=batch_s
            )

        try:
            return open_db()
        except ResultsDBCorruptError as e:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
            while aside.exists():
                n += 1
                aside = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
            try:
                for suffix in ("", "-wal", "-shm", "-journal"):
                    if (src := path.with_name(path.name + suffix)).exists():
                        src.replace(aside.with_name(aside.name + suffix))
            except OSError as move_error:
                raise ResultsDBError(path, f"corrupt, cannot move aside: {move_error}") from e
            log.error(
                "results.db is corrupt; moved aside, starting a fresh one",
                extra={"event": "results_db_recovered", "path": str(path),
                       "moved_to": str(aside), "reason": str(e)},
            )  # fmt: skip
        return open_db()

    # -- writing (writer thread) -----------------------------------------------------------

    def add(self, record: ResultRecord) -> list[ResultRecord]:
        """Buffer ``record``; commit the batch if it is full or old enough. Returns the
        records committed by this call (usually none).

        Raises:
            ResultsDBError: the commit failed; the batch stays buffered for a retry.
            RuntimeError: the database is closed.
        """
        self._conn()
        now = self._clock()
        if not self._buffer:
            self._oldest = now
        self._buffer.append(record)
        if len(self._buffer) >= self.batch_rows or now - self._oldest >= self.batch_s:
            return self.flush()
        return []

    def buffer(self, record: ResultRecord) -> None:
        """Buffer ``record`` without trying to commit (while commits fail, the caller
        retries ``flush`` at its own pace).

        Raises:
            RuntimeError: the database is closed.
        """
        self._conn()
        if not self._buffer:
            self._oldest = self._clock()
        self._buffer.append(record)

    @property
    def buffered(self) -> int:
        """Records waiting for a commit."""
        return len(self._buffer)

    def drop_oldest(self, count: int) -> list[ResultRecord]:
        """Remove and return the ``count`` oldest buffered records (never committed)."""
        dropped, self._buffer = self._buffer[:count], self._buffer[count:]
        return dropped

    def flush(self) -> list[ResultRecord]:
        """Commit every buffered record in one transaction; return them in order, stored
        ones with ``id`` set, skipped duplicates with ``id=None``.

        Raises:
            ResultsDBError: the commit failed (disk full, I/O error; ResultsDBCorruptError
                for corruption); nothing of the batch is stored and it stays buffered.
            RuntimeError: the database is closed.
        """
        conn = self._conn()
        if not self._buffer:
            return []
        done: list[ResultRecord] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for record in self._buffer:
                    cursor = conn.execute(_INSERT, _values(record))
                    stored = cursor.rowcount == 1
                    done.append(
                        ResultRecord(*_values(record), cursor.lastrowid) if stored else record
                    )
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.Error as e:
            raise self._error(f"cannot commit {len(self._buffer)} results", e) from e
        self._buffer = []
        for record in done:
            if record.id is None:
                log.warning(
                    "result for this source_key is already recorded; duplicate skipped",
                    extra={"event": "results_duplicate", "source_key": record.source_key,
                           "frame_id": record.frame_id},
                )  # fmt: skip
        return done

    def enforce_retention(self, now: float, *, max_batches: int = 10) -> int:
        """Delete rows with ``ts < now - max_age_s``, then the oldest rows (by id) beyond
        ``max_rows``, in transactions of ``DELETE_BATCH`` rows, at most ``max_batches`` per
        call (the next call goes on). Returns the number of rows deleted.

        Raises:
            ResultsDBError: a delete failed.
            RuntimeError: the database is closed.
        """
        conn = self._conn()
        deleted, batches = 0, 0
        try:
            if self.max_age_s is not None:
                cutoff, n = now - self.max_age_s, DELETE_BATCH
                while n == DELETE_BATCH and batches < max_batches:
                    n = self._delete(conn, "WHERE ts < ? ORDER BY ts", (cutoff,), DELETE_BATCH)
                    deleted, batches = deleted + n, batches + 1
            if self.max_rows is not None:
                excess = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] - self.max_rows
                while excess > 0 and batches < max_batches:
                    n = self._delete(conn, "ORDER BY id", (), min(excess, DELETE_BATCH))
                    deleted, batches, excess = deleted + n, batches + 1, excess - n
        except sqlite3.Error as e:
            raise self._error("cannot delete old results", e) from e
        return deleted

    def close(self) -> None:
        """Flush and close; idempotent. Raises ResultsDBError if the final flush fails
        (the connections are closed anyway)."""
        try:
            if self._writer is not None:
                self.flush()
        finally:
            self._close_connections()

    # -- reading (any thread) --------------------------------------------------------------

    def is_recorded(self, source_key: str) -> bool:
        """True if a committed row has ``source_key``. Raises ResultsDBError."""
        return bool(self._read("SELECT 1 FROM results WHERE source_key = ?", (source_key,)))

    def recent(self, since_ts: float, limit: int = 1000) -> list[ResultRecord]:
        """Committed rows with ``ts >= since_ts``, oldest first, at most ``limit``.
        Raises ResultsDBError."""
        rows = self._read(f"{_SELECT} WHERE ts >= ? ORDER BY ts, id LIMIT ?", (since_ts, limit))
        return [ResultRecord(*row) for row in rows]

    def count(self) -> int:
        """Number of committed rows. Raises ResultsDBError."""
        return int(self._read("SELECT COUNT(*) FROM results", ())[0][0])

    # -- internals -------------------------------------------------------------------------

    def _prepare(self, conn: sqlite3.Connection, verify: bool) -> None:
        if verify:
            problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise ResultsDBCorruptError(self.path, "integrity check: " + "; ".join(problems))
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ResultsDBError(self.path, f"schema {version} is newer than {SCHEMA_VERSION}")
        if version == 0 and conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            raise ResultsDBCorruptError(self.path, "holds tables but no schema version")
        # Only now change the file: a foreign or corrupt file is left as it was.
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            for statement in _MIGRATIONS[target]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        columns = sorted(r[1] for r in conn.execute("PRAGMA table_info(results)"))
        if columns != sorted(_COLUMNS.split()):
            raise ResultsDBCorruptError(self.path, f"unexpected results columns {columns}")

    @staticmethod
    def _delete(conn: sqlite3.Connection, where: str, args: tuple[float, ...], n: int) -> int:
        sql = f"DELETE FROM results WHERE id IN (SELECT id FROM results {where} LIMIT ?)"
        conn.execute("BEGIN IMMEDIATE")
        try:
            deleted = conn.execute(sql, (*args, n)).rowcount
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        return deleted

    def _read(self, sql: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]:
        with self._read_lock:
            if self._reader is None:
                raise RuntimeError(f"{self.path}: results database is closed")
            try:
                return self._reader.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise self._error("cannot read", e) from e

    def _conn(self) -> sqlite3.Connection:
        if self._writer is None:
            raise RuntimeError(f"{self.path}: results database is closed")
        return self._writer

    def _error(self, what: str, e: sqlite3.Error) -> ResultsDBError:
        kind = ResultsDBCorruptError if _is_corruption(e) else ResultsDBError
        return kind(self.path, f"{what}: {e}")

    def _close_connections(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        with self._read_lock:
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.close()
