"""The telemetry spool: bounds, oldest-first drops (counted), order, restarts and crashes."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from edge_agent.telemetry.spool import (
    BLOCK_BYTES,
    META_NAME,
    Spool,
    SpoolError,
    read_counts,
    window_name,
)


def _payload(seq: int, size: int = 100) -> bytes:
    head = f'{{"seq":{seq},"pad":"'.encode()
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


def _open(path: Path, *, max_windows: int = 100, max_bytes: int = 1 << 20) -> Spool:
    return Spool(path, max_bytes=max_bytes, max_windows=max_windows)


def _fill(spool: Spool, count: int) -> list[int]:
    seqs = []
    for _ in range(count):
        seq = spool.next_seq
        spool.append(seq, _payload(seq))
        seqs.append(seq)
    return seqs


def _queued(spool: Spool) -> list[int]:
    out: list[int] = []
    seq = spool.first_after(None)
    while seq is not None:
        out.append(seq)
        seq = spool.first_after(seq)
    return out


def test_windows_come_back_in_seq_order_with_their_bytes(tmp_path: Path) -> None:
    spool = _open(tmp_path)
    seqs = _fill(spool, 5)
    assert seqs == [0, 1, 2, 3, 4]
    assert _queued(spool) == seqs
    assert spool.read(3) == _payload(3)
    spool.remove(1)
    assert _queued(spool) == [0, 2, 3, 4]
    assert spool.read(1) is None
    counts = spool.counts()
    assert (counts.queued, counts.dropped, counts.next_seq) == (4, 0, 5)
    assert counts.bytes == 4 * BLOCK_BYTES


def test_count_bound_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    spool = _open(tmp_path, max_windows=3)
    _fill(spool, 3)
    seq = spool.next_seq
    assert spool.append(seq, _payload(seq)) == [0]
    _fill(spool, 2)
    assert _queued(spool) == [3, 4, 5]
    assert spool.counts().dropped == 3
    assert sorted(p.name for p in tmp_path.glob("*.win")) == [window_name(s) for s in (3, 4, 5)]


def test_byte_bound_counts_whole_blocks(tmp_path: Path) -> None:
    # Three blocks: a 2 KB window takes one block, so the fourth pushes out the first.
    spool = _open(tmp_path, max_bytes=3 * BLOCK_BYTES)
    for _ in range(4):
        seq = spool.next_seq
        spool.append(seq, _payload(seq, 2000))
    assert _queued(spool) == [1, 2, 3]
    assert spool.counts().dropped == 1
    assert spool.counts().bytes == 3 * BLOCK_BYTES


def test_drops_and_next_seq_survive_a_restart(tmp_path: Path) -> None:
    spool = _open(tmp_path, max_windows=2)
    _fill(spool, 5)
    again = _open(tmp_path, max_windows=2)
    counts = again.counts()
    assert (counts.queued, counts.dropped, counts.next_seq) == (2, 3, 5)
    assert _queued(again) == [3, 4]
    assert read_counts(tmp_path) == counts


def test_a_seq_is_never_reused_even_when_the_spool_is_empty(tmp_path: Path) -> None:
    spool = _open(tmp_path)
    for seq in _fill(spool, 3):
        spool.remove(seq)
    assert not list(tmp_path.glob("*.win"))
    assert _open(tmp_path).next_seq == 3


def test_crash_between_taking_the_seq_and_writing_the_window(tmp_path: Path) -> None:
    # The state file is written first: a crash after it loses that window, not its seq.
    spool = _open(tmp_path)
    _fill(spool, 2)
    (tmp_path / window_name(1)).unlink()
    spool = _open(tmp_path)
    assert spool.next_seq == 2
    assert _queued(spool) == [0]


def test_window_files_newer_than_the_state_file_win(tmp_path: Path) -> None:
    spool = _open(tmp_path)
    _fill(spool, 2)
    (tmp_path / META_NAME).write_text('{"v":1,"next_seq":0,"dropped":0}')
    assert _open(tmp_path).next_seq == 2


def test_a_torn_temp_file_is_ignored_and_removed(tmp_path: Path) -> None:
    spool = _open(tmp_path)
    _fill(spool, 2)
    torn = tmp_path / f".{window_name(2)}.0123456789ab.tmp"
    torn.write_bytes(b'{"seq":2,"pa')  # a power cut in the middle of a write
    spool = _open(tmp_path)
    assert _queued(spool) == [0, 1]
    assert spool.next_seq == 2
    assert not torn.exists()


def test_foreign_files_are_not_windows(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "12.win").write_text("too short a name")
    os.mkdir(tmp_path / window_name(7))
    assert _queued(_open(tmp_path)) == []


def test_discard_counts_as_dropped(tmp_path: Path) -> None:
    spool = _open(tmp_path)
    _fill(spool, 2)
    spool.discard(0, "fails the wire check")
    assert _queued(spool) == [1]
    assert _open(tmp_path).counts().dropped == 1


def test_a_seq_below_next_seq_is_refused_and_a_gap_is_allowed(tmp_path: Path) -> None:
    spool = _open(tmp_path)
    _fill(spool, 1)
    with pytest.raises(ValueError, match="expects 1"):
        spool.append(0, _payload(0))
    spool.append(5, _payload(5))  # seqs 1..4 were lost before the spool had them
    assert _queued(spool) == [0, 5] and spool.next_seq == 6
    assert _open(tmp_path).next_seq == 6


def test_first_seq_applies_only_to_a_new_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, max_windows=10, first_seq=1_000_000)
    assert _fill(spool, 2) == [1_000_000, 1_000_001]
    again = Spool(tmp_path, max_bytes=1 << 20, max_windows=10, first_seq=5)
    assert again.next_seq == 1_000_002


@pytest.mark.parametrize(
    "content",
    ["not json", "[]", '{"v":2,"next_seq":1,"dropped":0}', '{"v":1,"next_seq":-1,"dropped":0}'],
)
def test_a_bad_state_file_is_named(tmp_path: Path, content: str) -> None:
    (tmp_path / META_NAME).write_text(content)
    with pytest.raises(SpoolError, match=META_NAME):
        _open(tmp_path)


def test_read_counts_without_a_spool(tmp_path: Path) -> None:
    assert read_counts(tmp_path / "missing") is None


def test_state_file_is_small_json(tmp_path: Path) -> None:
    spool = _open(tmp_path, max_windows=1)
    _fill(spool, 3)
    assert json.loads((tmp_path / META_NAME).read_text()) == {
        "v": 1,
        "next_seq": 3,
        "dropped": 2,
    }


def test_read_counts_while_the_owner_sends_and_deletes(tmp_path: Path) -> None:
    # `edge-agent status` reads the spool from another process while the agent deletes
    # the windows it has sent: a file that vanishes between listing and stat is simply
    # no longer queued.
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, max_windows=100_000)
    stop = threading.Event()
    failures: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                read_counts(tmp_path / "spool")
            except FileNotFoundError as e:
                failures.append(e)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(300):
            seq = spool.next_seq
            spool.append(seq, b"{}" * 100)
            spool.remove(seq)
    finally:
        stop.set()
        thread.join()
    assert failures == []
