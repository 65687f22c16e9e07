"""Evidence images kept on the device: fail and uncertain frames and a sample of passes.

Contract:

* Layout: ``root/<outcome>/<YYYYMMDD>/<ts_ms>-<frame_id>.jpg`` (day of the capture time,
  UTC), written by ``writer`` (default ``write_atomic``: a dot-prefixed temp file in the
  same directory, fsync, rename, fsync directory), so only complete ``*.jpg`` files are
  ever visible under their final name.
* Each outcome has its own byte quota (missing or 0: nothing kept). Before a file is
  written, the oldest files of its outcome (by capture time, then frame id) are deleted
  until it fits, so usage never exceeds the quota; a file larger than its quota is not
  kept. Emptied day directories are removed.
* The index of files and sizes lives in memory and is rebuilt by scanning ``root`` at
  start; leftover dot-prefixed temp files from a crash are deleted then, and files not
  named by this store are neither counted nor touched. One store per ``root``, used from
  one thread.
* A disk problem (any ``OSError``: ENOSPC, EDQUOT, EACCES, EROFS, EIO) never reaches the
  caller: the store logs ONE error line naming the root and the error, sets
  ``disabled_reason`` and returns None from ``save`` without touching the disk until
  ``retry_s`` has passed on ``clock``; then the next save tries again (failing again
  extends the pause silently) and one info line says when writing works again.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from edge_agent.durable import write_atomic

_NAME = re.compile(r"(\d+)-(\d+)\.jpg")
_DAY = re.compile(r"\d{8}")
_OUTCOME = re.compile(r"[a-z]+")


def evidence_path(outcome: str, ts: float, frame_id: int) -> str:
    """Where the evidence image of a frame is kept, relative to the store's root."""
    return f"{outcome}/{time.strftime('%Y%m%d', time.gmtime(ts))}/{int(ts * 1000)}-{frame_id}.jpg"


class _Files:
    """The files of one outcome: sizes by relative path, and a heap for oldest-first."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.total = 0
        self._heap: list[tuple[int, int, str]] = []  # (ts_ms, frame_id, rel); lazy deletes

    def add(self, ts_ms: int, frame_id: int, rel: str, size: int) -> None:
        old = self.sizes.get(rel)
        if old is None:
            heapq.heappush(self._heap, (ts_ms, frame_id, rel))
        self.total += size - (old or 0)
        self.sizes[rel] = size

    def remove(self, rel: str) -> None:
        self.total -= self.sizes.pop(rel, 0)

    def oldest(self) -> str | None:
        while self._heap and self._heap[0][2] not in self.sizes:
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None


class EvidenceStore:
    """JPEG evidence under per-outcome quotas. See the module docstring for the contract."""

    def __init__(
        self,
        root: Path,
        *,
        quota_bytes: dict[str, int],
        pass_sample_every: int = 100,
        jpeg_quality: int = 90,
        writer: Callable[[Path, bytes], None] = write_atomic,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_s: float = 60.0,
    ) -> None:
        """Scan ``root`` (created if missing) and rebuild the index. A scan that fails
        with an OSError disables the store (logged) instead of raising.

        Raises:
            ValueError: an outcome name is not lowercase letters, or a number is negative
                or ``jpeg_quality`` is outside 0..100.
        """
        bad = [k for k, v in quota_bytes.items() if not _OUTCOME.fullmatch(k) or v < 0]
        if bad or pass_sample_every < 0 or retry_s < 0 or not 0 <= jpeg_quality <= 100:
            raise ValueError(f"invalid evidence settings (outcomes {bad})")
        self.root = root
        self.quota_bytes = dict(quota_bytes)
        self.pass_sample_every = pass_sample_every
        self.jpeg_quality = jpeg_quality
        self.retry_s = retry_s
        self.log = logger or logging.getLogger(__name__)
        self.disabled_reason: str | None = None
        self._writer = writer
        self._clock = clock
        self._retry_at = 0.0
        self._files = {outcome: _Files() for outcome in self.quota_bytes}
        self._scanned = False
        try:
            self._scan()
        except OSError as e:
            self._disable(e)

    def wants(self, outcome: str, frame_id: int) -> bool:
        """Whether ``save`` would keep this frame: its outcome has a quota, a pass frame is
        one of every ``pass_sample_every`` (``frame_id % n == 0``), and writing is not
        paused. Cheap: call it before encoding an image."""
        if self.quota_bytes.get(outcome, 0) <= 0:
            return False
        if outcome == "pass" and (
            self.pass_sample_every == 0 or frame_id % self.pass_sample_every != 0
        ):
            return False
        return self.disabled_reason is None or self._clock() >= self._retry_at

    def save(
        self,
        frame_id: int,
        ts: float,
        outcome: str,
        image_bgr: npt.NDArray[np.uint8] | None = None,
        jpeg: bytes | None = None,
    ) -> str | None:
        """Keep the frame if ``wants`` says so; return its path relative to ``root`` (with
        ``/``), or None when it is not kept (not wanted, too large, not encodable, or a
        disk problem, which is logged and pauses writing). Never raises for disk problems.

        Raises:
            ValueError: not exactly one of ``image_bgr`` / ``jpeg`` is given, or ``ts`` is
                not a finite, non-negative unix time.
        """
        if (image_bgr is None) == (jpeg is None):
            raise ValueError("give exactly one of image_bgr or jpeg")
        if not (math.isfinite(ts) and ts >= 0):
            raise ValueError(f"ts {ts} is not a unix time")
        if not self.wants(outcome, frame_id):
            return None
        data = self._encode(image_bgr) if image_bgr is not None else jpeg
        quota = self.quota_bytes[outcome]
        if data is None or len(data) > quota:
            return None
        ts_ms = int(ts * 1000)
        rel = evidence_path(outcome, ts, frame_id)
        path = self.root / rel
        files = self._files[outcome]
        try:
            if not self._scanned:  # the scan at start failed: the index is incomplete
                self._scan()
                files = self._files[outcome]
            while files.total - files.sizes.get(rel, 0) + len(data) > quota:
                self._evict(files)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writer(path, data)
        except OSError as e:
            if rel not in files.sizes:  # a writer that failed after its rename
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            self._disable(e)
            return None
        files.add(ts_ms, frame_id, rel, len(data))
        if self.disabled_reason is not None:
            self.log.info(
                "evidence writing works again under %s",
                self.root,
                extra={"event": "evidence_enabled", "root": str(self.root)},
            )
            self.disabled_reason = None
        return rel

    def usage(self) -> dict[str, int]:
        """Bytes kept per outcome (every outcome with a quota, 0 if none kept)."""
        return {outcome: files.total for outcome, files in self._files.items()}

    def count(self, outcome: str | None = None) -> int:
        """Number of files kept, of one outcome or of all."""
        if outcome is not None:
            return len(self._files[outcome].sizes) if outcome in self._files else 0
        return sum(len(files.sizes) for files in self._files.values())

    # -- internals -------------------------------------------------------------------------

    def _encode(self, image: npt.NDArray[np.uint8]) -> bytes | None:
        try:
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        except cv2.error as e:
            ok, buf = False, None
            self.log.warning(
                "cannot encode evidence image: %s", e, extra={"event": "evidence_encode_failed"}
            )
        return buf.tobytes() if ok and buf is not None else None

    def _evict(self, files: _Files) -> None:
        """Delete the oldest file of ``files``. Raises OSError if it cannot be deleted."""
        rel = files.oldest()
        if rel is None:  # cannot happen while total > 0; guards the caller's loop
            raise RuntimeError("evidence index is empty but over quota")
        path = self.root / rel
        path.unlink(missing_ok=True)
        files.remove(rel)
        with contextlib.suppress(OSError):  # not empty (or already gone): keep it
            path.parent.rmdir()

    def _disable(self, e: OSError) -> None:
        name = errno.errorcode.get(e.errno or 0, type(e).__name__)
        reason = f"{name}: {e.strerror or e}"
        self._retry_at = self._clock() + self.retry_s
        if self.disabled_reason is None:
            self.log.error(
                "evidence writing stopped under %s (%s); inspection goes on, retry in %g s",
                self.root,
                reason,
                self.retry_s,
                extra={"event": "evidence_disabled", "root": str(self.root), "error": reason},
            )
        else:
            self.log.debug("evidence still not writable: %s", reason)
        self.disabled_reason = reason

    def _scan(self) -> None:
        """Rebuild the index from disk; remove temp files and empty day directories.

        Raises:
            OSError: ``root`` cannot be created or listed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self._files = {outcome: _Files() for outcome in self.quota_bytes}
        for outcome, files in self._files.items():
            top = self.root / outcome
            if not top.is_dir():
                continue
            for day in sorted(os.scandir(top), key=lambda d: d.name):
                if not (_DAY.fullmatch(day.name) and day.is_dir(follow_symlinks=False)):
                    continue
                for entry in os.scandir(day.path):
                    if entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                        Path(entry.path).unlink(missing_ok=True)  # a crashed write's temp
                        continue
                    match = _NAME.fullmatch(entry.name)
                    if match and entry.is_file(follow_symlinks=False):
                        rel = f"{outcome}/{day.name}/{entry.name}"
                        ts_ms, frame_id = int(match[1]), int(match[2])
                        files.add(ts_ms, frame_id, rel, entry.stat().st_size)
                with contextlib.suppress(OSError):  # only succeeds when empty
                    os.rmdir(day.path)
        self._scanned = True
