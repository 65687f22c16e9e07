"""FolderSource on real files: exactly once, settling, moves, restarts, errors, close."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.core.frame import Frame
from edge_agent.sources.folder import FolderSource

SEC = 1_000_000_000


def _image(seed: int, ext: str = ".jpg") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, pixels)
    assert ok
    return buf.tobytes()


def _drop(inbox: Path, name: str, data: bytes, mtime_s: int | None = None) -> Path:
    path = inbox / name
    path.write_bytes(data)
    if mtime_s is not None:
        os.utime(path, ns=(mtime_s * SEC, mtime_s * SEC))
    return path


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def _batch(
    inbox: Path,
    *,
    is_recorded: Callable[[str], bool] | None = None,
    max_bytes: int = 1 << 20,
) -> FolderSource:
    """A fast source that ends when the inbox is drained."""
    return FolderSource(
        inbox,
        settle_s=0.0,
        poll_s=0.02,
        max_bytes=max_bytes,
        is_recorded=is_recorded,
        stop_when_empty=True,
    )


def _names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


def test_each_file_once_oldest_first_and_moved_per_outcome(inbox: Path) -> None:
    data = {
        "b.jpg": _image(1),
        "c.jpg": _image(2),
        "a.png": _image(3, ".png"),
        "d.bmp": _image(4, ".bmp"),
    }
    for name, mtime in (("b.jpg", 1000), ("c.jpg", 1000), ("a.png", 2000), ("d.bmp", 3000)):
        _drop(inbox, name, data[name], mtime)
    keys = {name: _key(inbox / name) for name in data}
    src = _batch(inbox)

    frames = list(src)

    assert [f.key for f in frames] == [keys[n] for n in ("b.jpg", "c.jpg", "a.png", "d.bmp")]
    assert [f.frame_id for f in frames] == [0, 1, 2, 3]
    for frame in frames:
        name = frame.key.split(":")[0] if frame.key else ""
        assert frame.source == src.name == f"folder:{inbox}"
        assert frame.data == data[name] and frame.image is None
        assert frame.timestamp == pytest.approx(os.stat(inbox / name).st_mtime)
    for frame, outcome in zip(frames, ("pass", "fail", "uncertain", "error"), strict=True):
        src.ack(frame, outcome)
    assert _names(inbox / "done") == {"b.jpg", "c.jpg", "a.png"}
    assert _names(inbox / "error") == {"d.bmp"}
    assert _names(inbox) == {"done", "error"}
    assert (inbox / "done" / "a.png").read_bytes() == data["a.png"]
    assert list(src) == []
    assert src.counters.frames == 4 and src.counters.errors == 0


def test_file_written_slowly_is_yielded_once_complete(inbox: Path) -> None:
    chunks = [os.urandom(4096) for _ in range(12)]
    full = b"".join(chunks)
    path = inbox / "slow.jpg"
    path.write_bytes(chunks[0])
    done_at: list[float] = []

    def write_rest() -> None:
        with open(path, "ab") as f:
            for chunk in chunks[1:]:
                time.sleep(0.08)
                f.write(chunk)
                f.flush()
        done_at.append(time.monotonic())

    src = FolderSource(inbox, settle_s=0.5, poll_s=0.03, stop_when_empty=True)
    writer = threading.Thread(target=write_rest)
    writer.start()
    watchdog = threading.Timer(8.0, src.close)
    watchdog.start()
    try:
        frames = []
        for frame in src:
            frames.append((frame, time.monotonic()))
    finally:
        watchdog.cancel()
        writer.join()
    assert len(frames) == 1
    frame, yielded_at = frames[0]
    assert frame.data == full
    assert yielded_at >= done_at[0] + 0.4  # waited for the size to stay still


def test_file_that_appeared_by_rename_also_waits_to_settle(inbox: Path) -> None:
    _drop(inbox, "x.jpg.part", _image(1)).rename(inbox / "x.jpg")
    src = FolderSource(inbox, settle_s=0.3, poll_s=0.02, stop_when_empty=True)
    start = time.monotonic()
    frames = list(src)
    assert len(frames) == 1
    assert time.monotonic() - start >= 0.3


def test_part_tmp_dot_other_and_subfolder_files_are_ignored(inbox: Path) -> None:
    ignored = ["copying.jpg.part", "x.tmp", ".hidden.jpg", "notes.txt", "y.JPG.Part"]
    for name in ignored:
        _drop(inbox, name, _image(9))
    (inbox / "sub").mkdir()
    _drop(inbox / "sub", "deep.jpg", _image(8))
    _drop(inbox, "good.JPG", _image(7))
    src = _batch(inbox)

    frames = list(src)

    assert [f.key.split(":")[0] for f in frames if f.key] == ["good.JPG"]
    src.ack(frames[0], "pass")
    assert _names(inbox) == {*ignored, "sub", "done"}
    assert _names(inbox / "sub") == {"deep.jpg"}


def test_file_deleted_between_listing_and_reading_is_skipped_and_logged(
    inbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name, mtime in (("a.jpg", 1000), ("gone.jpg", 2000), ("c.jpg", 3000)):
        _drop(inbox, name, _image(mtime), mtime)

    def delete_gone(key: str) -> bool:
        # Called after the listing, right before the read: the file vanishes in between.
        if key.startswith("gone.jpg:"):
            (inbox / "gone.jpg").unlink()
        return False

    src = _batch(inbox, is_recorded=delete_gone)
    with caplog.at_level(logging.INFO, logger="edge_agent.sources.folder"):
        frames = list(src)

    assert [f.key.split(":")[0] for f in frames if f.key] == ["a.jpg", "c.jpg"]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and getattr(warnings[0], "file", None) == "gone.jpg"
    assert src.counters.errors == 1 and src.counters.frames == 2


def test_restart_yields_only_unacknowledged_and_new_files(inbox: Path) -> None:
    for name, mtime in (("a.jpg", 1000), ("b.jpg", 2000), ("c.jpg", 3000)):
        _drop(inbox, name, _image(mtime), mtime)
    first = _batch(inbox)
    frames = list(first)
    first.ack(frames[0], "pass")
    first.ack(frames[1], "fail")
    # "Crash": c.jpg was yielded but its verdict never stored, so it is never acked.
    first.close()
    _drop(inbox, "d.jpg", _image(4000), 4000)

    again = list(_batch(inbox))

    assert [f.key for f in again] == [frames[2].key, _key(inbox / "d.jpg")]
    assert _names(inbox / "done") == {"a.jpg", "b.jpg"}


def test_recorded_file_goes_to_done_without_being_yielded(
    inbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorded_path = _drop(inbox, "recorded.jpg", _image(1), 1000)
    _drop(inbox, "new.jpg", _image(2), 2000)
    recorded = {_key(recorded_path)}
    asked: list[str] = []

    def is_recorded(key: str) -> bool:
        asked.append(key)
        return key in recorded

    src = _batch(inbox, is_recorded=is_recorded)
    with caplog.at_level(logging.INFO, logger="edge_agent.sources.folder"):
        frames = list(src)

    assert [f.key for f in frames] == [_key(inbox / "new.jpg")]
    assert sorted(asked) == sorted([*recorded, _key(inbox / "new.jpg")])
    assert _names(inbox / "done") == {"recorded.jpg"}
    assert any(getattr(r, "file", None) == "recorded.jpg" for r in caplog.records)
    assert src.counters.errors == 0


def test_name_clash_in_done_gets_a_suffix_instead_of_overwriting(inbox: Path) -> None:
    done = inbox / "done"
    done.mkdir()
    (done / "a.jpg").write_bytes(b"earlier")
    for expected in ("a~1.jpg", "a~2.jpg"):
        data = _image(len(expected) + len(_names(done)))
        _drop(inbox, "a.jpg", data)
        src = _batch(inbox)
        (frame,) = list(src)
        src.ack(frame, "pass")
        assert (done / expected).read_bytes() == data
    assert (done / "a.jpg").read_bytes() == b"earlier"


def test_oversize_file_goes_to_error_with_a_reason(
    inbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _drop(inbox, "big.jpg", os.urandom(5000), 1000)
    _drop(inbox, "small.jpg", _image(1), 2000)
    src = _batch(inbox, max_bytes=4000)
    with caplog.at_level(logging.WARNING, logger="edge_agent.sources.folder"):
        frames = list(src)

    assert [f.key.split(":")[0] for f in frames if f.key] == ["small.jpg"]
    assert _names(inbox / "error") == {"big.jpg", "big.jpg.reason.txt"}
    assert "too large" in (inbox / "error" / "big.jpg.reason.txt").read_text()
    assert any(getattr(r, "file", None) == "big.jpg" for r in caplog.records)
    assert src.counters.errors == 1


def test_file_changed_after_reading_stays_and_is_inspected_again(inbox: Path) -> None:
    path = _drop(inbox, "a.jpg", _image(1), 1000)
    src = _batch(inbox)
    (first,) = list(src)
    _drop(inbox, "a.jpg", _image(2) + b"more", 2000)  # overwritten while in the pipeline
    src.ack(first, "pass")
    assert _names(inbox) == {"a.jpg"}
    (second,) = list(src)
    assert second.key == _key(path) != first.key
    assert second.data == path.read_bytes()


def test_close_from_another_thread_stops_an_endless_iteration(inbox: Path) -> None:
    src = FolderSource(inbox, settle_s=0.0, poll_s=0.05)
    got: list[Frame] = []
    consumer = threading.Thread(target=lambda: got.extend(src))
    consumer.start()
    _drop(inbox, "a.jpg", _image(1))
    deadline = time.monotonic() + 3.0
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(got) == 1
    closed_at = time.monotonic()
    src.close()
    consumer.join(timeout=2.0)
    assert not consumer.is_alive()
    assert time.monotonic() - closed_at < 1.0


def test_bad_arguments_are_refused(tmp_path: Path, inbox: Path) -> None:
    with pytest.raises(ValueError, match="missing"):
        FolderSource(tmp_path / "missing")
    with pytest.raises(ValueError, match="poll_s"):
        FolderSource(inbox, poll_s=0)
    src = _batch(inbox)
    frame = Frame(0, 0.0, "x", data=b"x")
    with pytest.raises(ValueError, match="outcome"):
        src.ack(frame, "maybe")
