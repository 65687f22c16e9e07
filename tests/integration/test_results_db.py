"""ResultsDB on real SQLite files: batching, duplicates, retention, corruption, SIGKILL."""

from __future__ import annotations

import logging
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.sinks import results_db
from edge_agent.sinks.results_db import (
    ResultRecord,
    ResultsDB,
    ResultsDBCorruptError,
    ResultsDBError,
)

T0 = 1_700_000_000.0
LOGGER = "edge_agent.sinks.results_db"


def rec(i: int, *, ts: float | None = None, key: str | None = "auto") -> ResultRecord:
    return ResultRecord(
        frame_id=i,
        ts=T0 + i if ts is None else ts,
        source="folder:/inbox",
        source_key=f"img{i}.jpg:100:{i}" if key == "auto" else key,
        model="reference@1.0.0",
        p_defect=None if i % 7 == 0 else i / 1000,
        verdict="error" if i % 7 == 0 else "pass",
        latency_ms=4.5,
        error="decode failed" if i % 7 == 0 else None,
        evidence=f"fail/20231114/{i}.jpg" if i % 3 == 0 else None,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rows_commit_in_batches_and_read_back(tmp_path: Path) -> None:
    db = ResultsDB(tmp_path / "results.db", batch_rows=3, batch_s=3600)
    assert db.add(rec(0)) == []
    assert db.add(rec(1)) == []
    assert not db.is_recorded(rec(0).source_key or "")  # buffered is not committed
    committed = db.add(rec(2))
    assert [r.frame_id for r in committed] == [0, 1, 2]
    assert all(r.id is not None for r in committed)
    assert db.is_recorded("img1.jpg:100:1")
    assert db.add(rec(3)) == []
    assert [r.frame_id for r in db.flush()] == [3]
    assert db.flush() == []
    assert db.count() == 4
    stored = db.recent(T0 + 1)
    assert [r.frame_id for r in stored] == [1, 2, 3]
    assert stored[0] == committed[1]  # every column round-trips, NULLs included
    assert db.recent(T0, limit=2) == committed[:2]
    db.close()
    db.close()  # idempotent
    with pytest.raises(RuntimeError):
        db.add(rec(9))


def test_batch_age_triggers_commit_on_add(tmp_path: Path) -> None:
    clock = FakeClock()
    db = ResultsDB(tmp_path / "results.db", batch_rows=64, batch_s=0.2, clock=clock)
    assert db.add(rec(0)) == []
    clock.now += 0.1
    assert db.add(rec(1)) == []
    clock.now += 0.15  # the first row has waited 0.25 s
    assert [r.frame_id for r in db.add(rec(2))] == [0, 1, 2]
    db.close()


def test_wal_mode_schema_and_indexes(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    ResultsDB(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA user_version").fetchone() == (results_db.SCHEMA_VERSION,)
    indexes = {r[1]: r for r in conn.execute("PRAGMA index_list(results)")}
    assert indexes["results_source_key"][2] == 1  # unique
    assert indexes["results_source_key"][4] == 1  # partial
    assert "results_ts" in indexes
    conn.close()


def test_duplicate_source_key_is_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = ResultsDB(tmp_path / "results.db", batch_rows=100)
    db.add(rec(1))
    db.flush()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    db.add(rec(2, key=None))
    db.add(rec(3, key=None))  # rows without a key never collide
    db.add(rec(11, key="img1.jpg:100:1"))  # recorded in an earlier batch
    db.add(rec(12, key="same"))
    db.add(rec(13, key="same"))  # collides inside one batch
    done = db.flush()
    assert [r.frame_id for r in done] == [2, 3, 11, 12, 13]  # all acknowledged
    assert [r.id is None for r in done] == [False, False, True, False, True]
    assert db.count() == 4
    dups = [r for r in caplog.records if getattr(r, "event", None) == "results_duplicate"]
    assert [getattr(r, "frame_id", None) for r in dups] == [11, 13]
    db.close()


@pytest.mark.parametrize(
    ("field", "value"),
    [("verdict", "ok"), ("ts", float("nan")), ("latency_ms", float("inf"))],
)
def test_record_rejects_bad_values(field: str, value: object) -> None:
    good = {"frame_id": 1, "ts": T0, "source": "s", "source_key": None, "model": "m@1",
            "p_defect": 0.5, "verdict": "fail", "latency_ms": 1.0}  # fmt: skip
    with pytest.raises(ValueError, match=field if field != "verdict" else "verdict"):
        ResultRecord(**{**good, field: value})  # type: ignore[arg-type]


def test_failed_commit_stores_nothing_and_keeps_the_batch(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    db = ResultsDB(path, batch_rows=100)
    other = sqlite3.connect(path)
    other.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON results WHEN NEW.frame_id = 3"
        " BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
    )
    other.commit()
    for i in range(5):
        db.add(rec(i))
    with pytest.raises(ResultsDBError, match="refused by test") as info:
        db.flush()
    assert str(path) in str(info.value)
    assert db.count() == 0  # one transaction: none of the batch
    other.execute("DROP TRIGGER boom")
    other.commit()
    other.close()
    assert [r.frame_id for r in db.flush()] == [0, 1, 2, 3, 4]
    db.close()


def test_retention_by_age_then_by_rows(tmp_path: Path) -> None:
    db = ResultsDB(tmp_path / "results.db", max_age_s=100.0, max_rows=50, batch_rows=1000)
    for i in range(300):
        db.add(rec(i))
    db.flush()
    # rows with ts < T0 + 150 are older than 100 s at now = T0 + 250
    assert db.enforce_retention(T0 + 250) == 150 + 100
    left = db.recent(0, limit=1000)
    assert [r.frame_id for r in left] == list(range(250, 300))
    assert db.enforce_retention(T0 + 250) == 0
    db.close()


def test_retention_works_in_bounded_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(results_db, "DELETE_BATCH", 10)
    db = ResultsDB(tmp_path / "results.db", max_age_s=None, max_rows=5, batch_rows=1000)
    for i in range(60):
        db.add(rec(i))
    db.flush()
    assert db.enforce_retention(T0, max_batches=2) == 20  # the rest waits for the next call
    assert db.enforce_retention(T0, max_batches=2) == 20
    assert db.enforce_retention(T0, max_batches=2) == 15
    assert [r.frame_id for r in db.recent(0)] == [55, 56, 57, 58, 59]
    db.close()


def test_reads_work_from_another_thread(tmp_path: Path) -> None:
    db = ResultsDB(tmp_path / "results.db", batch_rows=1)
    db.add(rec(5))
    answers: list[bool] = []
    thread = threading.Thread(target=lambda: answers.append(db.is_recorded("img5.jpg:100:5")))
    thread.start()
    thread.join()
    assert answers == [True]
    db.close()


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database, just bytes\n" * 200)


def _damaged_pages(path: Path) -> None:
    db = ResultsDB(path, batch_rows=5000)
    for i in range(3000):
        db.add(rec(i))
    db.close()
    data = bytearray(path.read_bytes())
    data[8192:40960] = b"\xa5" * (40960 - 8192)
    path.write_bytes(bytes(data))


def _foreign(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("damage", [_garbage, _damaged_pages, _foreign], ids=lambda f: f.__name__)
def test_corrupt_file_is_named_and_moved_aside(
    tmp_path: Path, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "results.db"
    damage(path)
    before = path.read_bytes()
    with pytest.raises(ResultsDBCorruptError) as info:
        ResultsDB(path)
    assert str(path) in str(info.value)
    caplog.set_level(logging.INFO, logger=LOGGER)
    db = ResultsDB.open_or_recover(path)
    assert db.count() == 0
    db.add(rec(1))
    db.close()
    aside = list(tmp_path.glob("results.db.corrupt-*"))
    assert [p.read_bytes() for p in aside if not p.name.endswith(("-wal", "-shm"))] == [before]
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert "results.db.corrupt-" in str(getattr(caplog.records[0], "moved_to", ""))


def test_newer_schema_is_refused_not_moved(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    ResultsDB(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ResultsDBError, match="newer") as info:
        ResultsDB.open_or_recover(path)
    assert not isinstance(info.value, ResultsDBCorruptError)
    assert list(tmp_path.glob("*.corrupt-*")) == []


def test_unopenable_path_raises_named_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ResultsDBError, match="file"):
        ResultsDB.open_or_recover(tmp_path / "file" / "results.db")


_CRASH_SCRIPT = """
import os, signal, sys
from pathlib import Path
from edge_agent.sinks.results_db import ResultRecord, ResultsDB

path, n, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def rec(i):
    return ResultRecord(i, 1.7e9 + i, "s", f"k{i}", "m@1", 0.1, "pass", 1.0)

db = ResultsDB(path, batch_rows=50, batch_s=3600)
committed = sum(len(db.add(rec(i))) for i in range(n))
print(committed, flush=True)
if mode == "in-commit":
    calls = [0]
    def kill_later():
        calls[0] += 1
        if calls[0] == 20:  # some rows of the next batch are inserted, not committed
            os.kill(os.getpid(), signal.SIGKILL)
        return 0
    db._writer.set_progress_handler(kill_later, 50)
    for i in range(n, n + 50):
        db.add(rec(i))
else:
    for i in range(n, n + 25):
        db.add(rec(i))
    os.kill(os.getpid(), signal.SIGKILL)
print("not killed", flush=True)
"""


@pytest.mark.parametrize("mode", ["buffered", "in-commit"])
def test_committed_rows_survive_sigkill(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "results.db"
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(path), "200", mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["200"]
    assert (tmp_path / "results.db-wal").exists()  # the kill left the WAL behind
    db = ResultsDB(path)
    assert [r.frame_id for r in db.recent(0, limit=1000)] == list(range(200))
    db.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
