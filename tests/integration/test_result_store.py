"""GuardedResults on a real, really full file system: the line never sees the error,
results wait in memory, commit once space is back, and the oldest are given up (counted)
when the disk stays full too long."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_agent.sinks.result_store import GuardedResults
from edge_agent.sinks.results_db import ResultsDB
from tests.integration.test_results_db import FakeClock, rec
from tests.tmpfs import small_tmpfs


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_a_full_disk_never_stops_the_line_and_nothing_is_lost_once_space_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    with small_tmpfs(tmp_path / "state", "1m") as state:
        db = ResultsDB(state / "results.db", batch_rows=8, clock=clock)
        try:
            _fill_and_recover(db, state, clock, caplog)
        finally:
            db.close()


def _fill_and_recover(
    db: ResultsDB, state: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    results = GuardedResults(db, clock=clock, retry_s=1.0, max_unstored=10_000)
    committed = [r for i in range(16) for r in results.add(rec(i))]
    assert len(committed) == 16
    filler = _fill(state)
    with caplog.at_level(logging.ERROR, logger="edge_agent.results"):
        for i in range(16, 400):
            committed += results.add(rec(i))
            clock.now += 0.01
    assert results.failing
    assert len(committed) == 16
    assert [r.event for r in caplog.records].count("results_db_failed") == 1  # type: ignore[attr-defined]
    filler.unlink()
    clock.now += 2.0
    committed += results.flush()
    assert not results.failing
    assert [r.frame_id for r in committed] == list(range(400))
    assert results.lost == 0 and results.take_given_up() == []


def test_the_oldest_results_are_given_up_beyond_the_bound(tmp_path: Path) -> None:
    clock = FakeClock()
    with small_tmpfs(tmp_path / "state", "1m") as state:
        db = ResultsDB(state / "results.db", batch_rows=8, clock=clock)
        try:
            results = GuardedResults(db, clock=clock, retry_s=1.0, max_unstored=50)
            assert len(results.add(rec(0))) == 0
            assert len(results.flush()) == 1
            filler = _fill(state)
            for i in range(1, 201):
                results.add(rec(i))
            given_up = results.take_given_up()
            assert results.lost == len(given_up) == 150
            assert [r.frame_id for r in given_up] == list(range(1, 151))
            filler.unlink()
            clock.now += 2.0
            assert [r.frame_id for r in results.flush()] == list(range(151, 201))
        finally:
            db.close()
