"""The update state file: trusted time never goes back, crashes are counted, corruption
does not brick."""

from __future__ import annotations

import json
from pathlib import Path

from edge_agent.update.state import MAX_BLOCKLIST, StateFile, UpdateState


def test_fresh_device_has_empty_state(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    assert state.state == UpdateState()
    assert not (tmp_path / "state.json").exists()


def test_14_clock_set_backwards_keeps_trusted_time(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = StateFile(path)
    assert state.trusted_now(wall=2_000_000_000.0).timestamp() == 2_000_000_000.0
    # The clock is set back a year: trusted time stays where it was, across restarts.
    assert state.trusted_now(wall=1_968_000_000.0).timestamp() == 2_000_000_000.0
    assert StateFile(path).trusted_now(wall=1_000.0).timestamp() == 2_000_000_000.0
    assert StateFile(path).trusted_now(wall=2_000_000_100.0).timestamp() == 2_000_000_100.0


def test_attempts_count_across_restarts_and_reset_per_bundle(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert StateFile(path).begin_attempt("a" * 64, "models/m-2.tar") == 1
    assert StateFile(path).begin_attempt("a" * 64, "models/m-2.tar") == 2
    assert StateFile(path).begin_attempt("b" * 64, "models/m-3.tar") == 1
    state = StateFile(path)
    state.clear_pending()
    assert StateFile(path).state.pending is None


def test_counters_only_rise(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = StateFile(path)
    state.raise_counter("m", 5)
    state.raise_counter("m", 3)
    assert StateFile(path).state.counters == {"m": 5}


def test_blocklist_is_bounded_oldest_first(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    for i in range(MAX_BLOCKLIST + 10):
        state.block(f"{i:064x}", "gate_nan")
    blocklist = StateFile(tmp_path / "state.json").state.blocklist
    assert len(blocklist) == MAX_BLOCKLIST
    assert f"{0:064x}" not in blocklist and f"{MAX_BLOCKLIST + 9:064x}" in blocklist


def test_corrupt_state_is_kept_aside_and_time_floor_survives(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"counters": {"m": "not a number"')
    state = StateFile(path)
    assert state.state.counters == {}
    assert (tmp_path / "state.json.corrupt").exists()
    # The floor starts at the corrupt file's mtime, not at zero.
    assert state.state.time_floor > 1_000_000_000


def test_state_file_is_plain_json(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    state.block("c" * 64, "gate_golden")
    document = json.loads((tmp_path / "state.json").read_text())
    assert document["blocklist"] == {"c" * 64: "gate_golden"}
