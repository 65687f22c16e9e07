"""EvidenceStore on real directories: layout, sampling, quotas, restart, full disks."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.durable import write_atomic
from edge_agent.sinks.evidence import EvidenceStore

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
DAY0 = time.strftime("%Y%m%d", time.gmtime(T0))
LOGGER = "edge_agent.sinks.evidence"
QUOTA = {"fail": 10_000, "uncertain": 5_000, "pass": 5_000, "error": 0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingWriter:
    """The real atomic writer, counting calls; ``fail_with`` makes it raise instead."""

    def __init__(self, fail_with: int | None = None) -> None:
        self.calls = 0
        self.fail_with = fail_with

    def __call__(self, path: Path, data: bytes) -> None:
        self.calls += 1
        if self.fail_with is not None:
            raise OSError(self.fail_with, os.strerror(self.fail_with), str(path))
        write_atomic(path, data)


def blob(n: int, tag: int = 0) -> bytes:
    """Fake JPEG bytes of length ``n`` (the store does not decode what it is given)."""
    return b"\xff\xd8" + bytes([tag % 256]) * (n - 4) + b"\xff\xd9"


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_layout_and_encoding(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path, quota_bytes={"fail": 10_000_000}, jpeg_quality=80)
    image = np.full((48, 64, 3), (10, 120, 240), np.uint8)
    rel = store.save(7, T0 + 0.1234, "fail", image_bgr=image)
    assert rel == f"fail/{DAY0}/{int((T0 + 0.1234) * 1000)}-7.jpg"
    decoded = cv2.imdecode(np.frombuffer((tmp_path / rel).read_bytes(), np.uint8), 1)
    assert decoded is not None and decoded.shape == (48, 64, 3)
    assert abs(int(decoded[20, 30, 2]) - 240) < 8  # the pixels, not just a header
    assert store.save(8, T0, "fail", jpeg=blob(500)) == f"fail/{DAY0}/{int(T0 * 1000)}-8.jpg"
    assert store.count() == 2
    assert store.usage()["fail"] == (tmp_path / rel).stat().st_size + 500
    with pytest.raises(ValueError, match="exactly one"):
        store.save(9, T0, "fail")
    with pytest.raises(ValueError, match="exactly one"):
        store.save(9, T0, "fail", image_bgr=image, jpeg=blob(10))


def test_which_frames_are_kept(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path, quota_bytes=QUOTA, pass_sample_every=10)
    kept = {
        outcome: [i for i in range(50) if store.save(i, T0 + i, outcome, jpeg=blob(20))]
        for outcome in ("pass", "fail", "uncertain", "error", "unknown")
    }
    assert kept["pass"] == [0, 10, 20, 30, 40]
    assert kept["fail"] == kept["uncertain"] == list(range(50))
    assert kept["error"] == kept["unknown"] == []  # quota 0 / no quota
    assert [store.wants("pass", i) for i in (0, 5, 10)] == [True, False, True]
    none = EvidenceStore(tmp_path / "none", quota_bytes=QUOTA, pass_sample_every=0)
    assert not any(none.wants("pass", i) for i in range(200))
    assert none.save(0, T0, "pass", jpeg=blob(20)) is None


def fail_ids(root: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (root / "fail").rglob("*.jpg"))


def test_eviction_is_oldest_first_per_outcome(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path, quota_bytes=QUOTA)  # fail: 10_000 bytes = 3 files
    day = 86400.0
    yesterday = time.strftime("%Y%m%d", time.gmtime(T0 - day))
    store.save(1, T0, "uncertain", jpeg=blob(3000))
    # capture times out of order; two of them a day earlier
    for i, ts in [(1, T0 + 5), (2, T0 - day + 1), (3, T0 + 1)]:
        assert store.save(i, ts, "fail", jpeg=blob(3000)) is not None
    assert store.save(4, T0 - day, "fail", jpeg=blob(3000)) is not None
    assert fail_ids(tmp_path) == [1, 3, 4]  # 2 went: 4 is older, but 2 was the oldest stored
    store.save(5, T0 + 9, "fail", jpeg=blob(3000))
    assert fail_ids(tmp_path) == [1, 3, 5]
    assert not (tmp_path / "fail" / yesterday).exists()  # emptied day directory removed
    store.save(6, T0 + 10, "fail", jpeg=blob(3000))
    assert fail_ids(tmp_path) == [1, 5, 6]
    assert store.usage() == {"fail": 9000, "uncertain": 3000, "pass": 0, "error": 0}
    assert store.count("uncertain") == 1  # another outcome's quota is untouched
    assert store.save(7, T0, "fail", jpeg=blob(10_001)) is None  # larger than the quota
    assert fail_ids(tmp_path) == [1, 5, 6]


def test_index_is_rebuilt_on_restart(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path, quota_bytes=QUOTA)
    for i in range(3):
        store.save(i, T0 + i, "fail", jpeg=blob(3000, i))
    store.save(0, T0, "uncertain", jpeg=blob(1000))
    day_dir = tmp_path / "fail" / DAY0
    (day_dir / f".{int(T0 * 1000)}-9.jpg.tmp-4242").write_bytes(b"partial")  # crashed write
    (day_dir / "notes.txt").write_text("left by a person")
    (tmp_path / "fail" / "20200101").mkdir()  # an empty day
    again = EvidenceStore(tmp_path, quota_bytes=QUOTA)
    assert (
        again.usage() == store.usage() == {"fail": 9000, "uncertain": 1000, "pass": 0, "error": 0}
    )
    assert again.count() == 4
    assert not list(tmp_path.rglob(".*"))
    assert (day_dir / "notes.txt").exists()
    assert not (tmp_path / "fail" / "20200101").exists()
    again.save(3, T0 + 3, "fail", jpeg=blob(3000))  # the oldest from the last run goes
    assert not (day_dir / f"{int(T0 * 1000)}-0.jpg").exists()
    assert (day_dir / f"{int((T0 + 1) * 1000)}-1.jpg").exists()


def test_failed_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = EvidenceStore(tmp_path, quota_bytes=QUOTA)
    assert store.save(1, T0, "fail", jpeg=blob(1000)) is not None

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)  # fails after the temp file is written
    assert store.save(2, T0 + 1, "fail", jpeg=blob(1000)) is None
    monkeypatch.undo()
    assert files_under(tmp_path) == [f"fail/{DAY0}/{int(T0 * 1000)}-1.jpg"]
    assert store.disabled_reason is not None and "EIO" in store.disabled_reason
    assert len(error_records(caplog)) == 1


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EACCES])
def test_disk_errors_pause_writing_with_one_log_line(
    tmp_path: Path, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock, writer = FakeClock(), CountingWriter(fail_with=code)
    store = EvidenceStore(tmp_path, quota_bytes=QUOTA, writer=writer, clock=clock, retry_s=60)
    results = [store.save(i, T0 + i, "fail", jpeg=blob(100)) for i in range(50)]
    assert results == [None] * 50
    assert writer.calls == 1  # the later saves did not touch the disk
    assert not store.wants("fail", 1)
    (record,) = error_records(caplog)
    assert str(tmp_path) in record.getMessage()
    assert errno.errorcode[code] in record.getMessage()
    assert store.disabled_reason is not None and errno.errorcode[code] in store.disabled_reason

    clock.now += 61  # back-off over: one try, still failing, no new error line
    assert store.wants("fail", 1)
    assert store.save(100, T0, "fail", jpeg=blob(100)) is None
    assert store.save(101, T0, "fail", jpeg=blob(100)) is None
    assert writer.calls == 2
    assert len(error_records(caplog)) == 1

    writer.fail_with = None
    clock.now += 30
    assert store.save(102, T0, "fail", jpeg=blob(100)) is None  # still inside the pause
    clock.now += 31
    assert store.save(103, T0, "fail", jpeg=blob(100)) is not None
    assert store.disabled_reason is None
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        f"evidence writing works again under {tmp_path}"
    ]
    assert files_under(tmp_path) == [f"fail/{DAY0}/{int(T0 * 1000)}-103.jpg"]


def test_unusable_root_disables_instead_of_raising(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "not-a-dir"
    root.write_text("x")
    store = EvidenceStore(root, quota_bytes=QUOTA)
    assert store.disabled_reason is not None
    assert store.save(1, T0, "fail", jpeg=blob(10)) is None
    assert len(error_records(caplog)) == 1


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """A 1 MiB tmpfs when this process may mount one (root); else a plain directory.

    Yields (directory, is_real_tmpfs)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    try:
        yield mount_point, mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk(small_disk: tuple[Path, bool], caplog: pytest.LogCaptureFixture) -> None:
    """A real full filesystem (tmpfs) if mount works, else an injected ENOSPC writer."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    root, real = small_disk
    writer = CountingWriter(fail_with=None if real else errno.ENOSPC)
    clock = FakeClock()
    store = EvidenceStore(
        root, quota_bytes={"fail": 50_000_000}, writer=writer, clock=clock, retry_s=60
    )
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)  # ~360 KB as JPEG
    kept: dict[str, bytes] = {}
    for i in range(12):
        jpeg = cv2.imencode(".jpg", np.roll(noise, i, axis=1))[1].tobytes()
        rel = store.save(i, T0 + i, "fail", jpeg=jpeg)
        if rel is not None:
            kept[rel] = jpeg
    assert store.disabled_reason is not None and "ENOSPC" in store.disabled_reason
    assert (len(kept) == 2) if real else (kept == {})
    calls = writer.calls
    assert calls == len(kept) + 1  # writing stopped at the first failure
    (record,) = error_records(caplog)
    assert str(root) in record.getMessage() and "ENOSPC" in record.getMessage()
    # only complete files are visible: no temp file left behind, every jpg intact
    assert files_under(root) == sorted(kept)
    assert all((root / rel).read_bytes() == data for rel, data in kept.items())

    clock.now += 61
    small = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    if real:  # make room the way an operator would
        (root / next(iter(kept))).unlink()
    else:
        writer.fail_with = None
    assert store.save(99, T0 + 99, "fail", jpeg=small) is not None
    assert store.disabled_reason is None
    assert len(error_records(caplog)) == 1
    assert any("works again" in r.getMessage() for r in caplog.records)
