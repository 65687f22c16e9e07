"""A bounded on-disk spool of encoded telemetry windows: store and forward.

Layout of the spool directory::

    spool.json                  {"v": 1, "next_seq": N, "dropped": D}
    0000000000000017.win        the encoded window with seq 17, exactly as it is sent
    .0000000000000018.win.<hex>.tmp   a write in progress (removed at open)

One file per window, each written atomically (``write_atomic``: temp file, fsync,
rename, fsync the directory), so a crash leaves a window either whole or absent, never
torn; temp files left by a crash are deleted at open. ``spool.json`` is written (also
atomically) *before* the window file, in the same call that takes the seq, so a seq is
never handed out twice, even across a crash between the two writes (that window is then
lost, and its seq with it). At open, ``next_seq`` is the larger of the stored value and
the highest window file plus one.

Bounds: at most ``max_windows`` files, and at most ``max_bytes`` where a window counts as
its size rounded up to a 4 KiB block (what one small file takes on ext4, f2fs and
most other file systems), so the bound holds for the disk, not just the payloads. When an
append would break a bound, the oldest windows are deleted first and counted in
``dropped``, which is stored in ``spool.json`` and survives restarts.

Removing a sent window does not fsync the directory: if a crash undoes the removal, the
window is sent again, and the server drops the repeated seq.

Thread-safe: the agent appends, the publisher reads and removes, status reads counts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edge_agent.durable import write_atomic

log = logging.getLogger("edge_agent.telemetry")

BLOCK_BYTES: Final = 4096
META_NAME: Final = "spool.json"
_SUFFIX: Final = ".win"
_WINDOW_RE: Final = re.compile(r"([0-9]{16,20})\.win")
_VERSION: Final = 1


class SpoolError(Exception):
    """The spool's own state file is unreadable or invalid; the message names the file."""


@dataclass(frozen=True, slots=True)
class SpoolCounts:
    """``queued``: windows waiting to be sent; ``dropped``: windows deleted unsent from a
    full spool (ever, on this device); ``bytes``: disk the queued windows count for."""

    queued: int
    dropped: int
    bytes: int
    next_seq: int


def block_size(payload_bytes: int) -> int:
    """What a window of ``payload_bytes`` counts for against the byte bound."""
    return max(1, -(-payload_bytes // BLOCK_BYTES)) * BLOCK_BYTES


def window_name(seq: int) -> str:
    return f"{seq:016d}{_SUFFIX}"


class Spool:
    """The spool in ``directory`` (created if missing).

    Args:
        directory: where the windows and ``spool.json`` live.
        max_bytes: byte bound (blocks, see the module doc); at least one block.
        max_windows: count bound; at least 1.
        first_seq: the seq of the first window ever, used only when the directory has
            no state yet (the agent passes the time in milliseconds, so a device whose
            state was wiped does not reuse seqs the server has already seen).

    Raises:
        SpoolError: ``spool.json`` exists but is not a valid state file.
        OSError: the directory cannot be created or read.
    """

    def __init__(
        self, directory: Path, *, max_bytes: int, max_windows: int, first_seq: int = 0
    ) -> None:
        if max_bytes < BLOCK_BYTES or max_windows < 1:
            raise ValueError(f"spool bounds too small: {max_bytes} bytes, {max_windows} windows")
        if first_seq < 0:
            raise ValueError(f"first_seq must be >= 0, got {first_seq}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_windows = max_windows
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".*.tmp"):
            stale.unlink(missing_ok=True)  # a write a crash interrupted: never complete
        meta = read_meta(directory)
        self._index = _scan(directory)  # seq -> payload size, oldest first
        stored_next, self._dropped = meta if meta is not None else (first_seq, 0)
        highest = max(self._index) + 1 if self._index else 0
        self._next_seq = max(stored_next, highest)
        self._bytes = sum(block_size(size) for size in self._index.values())
        self._counts = self._count()

    @property
    def next_seq(self) -> int:
        """The lowest seq the next appended window may carry."""
        return self._counts.next_seq

    def counts(self) -> SpoolCounts:
        """The counts after the last change; never waits for a write in progress (the
        connect hook that publishes the device state reads them on the network thread)."""
        return self._counts

    def _count(self) -> SpoolCounts:
        return SpoolCounts(len(self._index), self._dropped, self._bytes, self._next_seq)

    def append(self, seq: int, payload: bytes) -> list[int]:
        """Store the window ``seq`` (``next_seq`` or later: a gap is a seq never used);
        return the seqs of the oldest windows deleted to make room (already counted in
        ``dropped``).

        Raises:
            ValueError: ``seq`` is below ``next_seq`` (it may have been sent already),
                or the payload alone breaks the byte bound (a programming error: windows
                are at most 2 KB).
            OSError: the disk refused the write. ``next_seq`` may have moved on (the seq
                is then never used); the window is not stored.
        """
        size = block_size(len(payload))
        with self._lock:
            if seq < self._next_seq:
                raise ValueError(f"window seq {seq} appended, spool expects {self._next_seq}+")
            if size > self.max_bytes:
                raise ValueError(f"window of {len(payload)} bytes exceeds the spool bound")
            victims: list[int] = []
            kept_bytes, kept = self._bytes, len(self._index)
            for old, old_size in self._index.items():
                if kept_bytes + size <= self.max_bytes and kept + 1 <= self.max_windows:
                    break
                victims.append(old)
                kept_bytes -= block_size(old_size)
                kept -= 1
            _write_meta(self.directory, seq + 1, self._dropped + len(victims))
            self._next_seq = seq + 1
            self._dropped += len(victims)
            for old in victims:
                self._bytes -= block_size(self._index.pop(old))
                (self.directory / window_name(old)).unlink(missing_ok=True)
            try:
                write_atomic(self.directory / window_name(seq), payload)
            finally:
                self._counts = self._count()
            self._index[seq] = len(payload)
            self._bytes += size
            self._counts = self._count()
        if victims:
            log.warning(
                "telemetry spool full: oldest windows dropped",
                extra={
                    "event": "spool_dropped",
                    "dropped_seqs": [victims[0], victims[-1]],
                    "count": len(victims),
                    "dropped_total": self._dropped,
                },
            )
        return victims

    def first_after(self, seq: int | None) -> int | None:
        """The oldest queued seq greater than ``seq`` (any, if None); None when there is
        none."""
        with self._lock:
            for queued in self._index:
                if seq is None or queued > seq:
                    return queued
        return None

    def read(self, seq: int) -> bytes | None:
        """The stored payload of ``seq``; None if it is not (or no longer) queued.

        Raises:
            OSError: the file is there but cannot be read.
        """
        with self._lock:
            if seq not in self._index:
                return None
            try:
                return (self.directory / window_name(seq)).read_bytes()
            except FileNotFoundError:
                # Deleted under us (by hand): forget it rather than wait for it forever.
                self._bytes -= block_size(self._index.pop(seq))
                self._counts = self._count()
                return None

    def remove(self, seq: int) -> None:
        """Forget a window that was sent (acknowledged by the broker)."""
        with self._lock:
            size = self._index.pop(seq, None)
            if size is None:
                return
            self._bytes -= block_size(size)
            self._counts = self._count()
            (self.directory / window_name(seq)).unlink(missing_ok=True)

    def discard(self, seq: int, reason: str) -> None:
        """Delete an unsendable window (it fails the wire check) and count it as dropped."""
        with self._lock:
            size = self._index.pop(seq, None)
            if size is None:
                return
            self._bytes -= block_size(size)
            self._dropped += 1
            self._counts = self._count()
            _write_meta(self.directory, self._next_seq, self._dropped)
            (self.directory / window_name(seq)).unlink(missing_ok=True)
        log.error(
            "telemetry window discarded",
            extra={"event": "spool_discarded", "seq": seq, "reason": reason},
        )


def read_counts(directory: Path) -> SpoolCounts | None:
    """Counts of the spool in ``directory`` without changing anything (for ``edge-agent
    status``, in another process); None when there is no spool there.

    Raises:
        SpoolError: ``spool.json`` is invalid.
    """
    if not directory.is_dir():
        return None
    meta = read_meta(directory)
    index = _scan(directory)
    next_seq, dropped = meta if meta is not None else (0, 0)
    highest = max(index) + 1 if index else 0
    total = sum(block_size(size) for size in index.values())
    return SpoolCounts(len(index), dropped, total, max(next_seq, highest))


def read_meta(directory: Path) -> tuple[int, int] | None:
    """``(next_seq, dropped)`` from ``spool.json``; None if it does not exist.

    Raises:
        SpoolError: not a valid state file (named).
    """
    path = directory / META_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SpoolError(f"{path}: cannot read: {e.strerror}") from e
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpoolError(f"{path}: not JSON: {e}") from e
    if not isinstance(document, dict) or document.get("v") != _VERSION:
        raise SpoolError(f"{path}: not a version {_VERSION} spool state")
    next_seq, dropped = document.get("next_seq"), document.get("dropped")
    if type(next_seq) is not int or type(dropped) is not int or min(next_seq, dropped) < 0:
        raise SpoolError(f"{path}: next_seq and dropped must be non-negative integers")
    return next_seq, dropped


def _write_meta(directory: Path, next_seq: int, dropped: int) -> None:
    document = {"v": _VERSION, "next_seq": next_seq, "dropped": dropped}
    write_atomic(directory / META_NAME, json.dumps(document, separators=(",", ":")).encode())


def _scan(directory: Path) -> dict[int, int]:
    found: list[tuple[int, int]] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _WINDOW_RE.fullmatch(entry.name)
            if match is None or not entry.is_file(follow_symlinks=False):
                continue
            try:
                size = entry.stat().st_size
            except FileNotFoundError:
                # Sent and deleted by the running agent while another process (the
                # status command) was reading the directory: no longer queued.
                continue
            found.append((int(match.group(1)), size))
    found.sort()
    return dict(found)
