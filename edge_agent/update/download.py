"""Resumable download of one TUF target (a bundle tar) over MQTT, a window of chunks at once.

python-tuf verifies the metadata elsewhere; the caller passes the signed ``length`` and
``sha256`` and nothing the server says about the file is trusted. Chunks of
``fetch_wire.CHUNK_SIZE`` bytes are written by offset into ``<work_dir>/<sha256>.part``
(preallocated to ``length``, so a full disk fails before the transfer). Which chunks are on
disk is recorded in ``<sha256>.bitmap``::

    b"EFB1" | length (uint64 BE) | chunk size (uint32 BE) | one bit per chunk, LSB first

The bitmap is only ever replaced atomically and only after the data it claims was
fdatasync'ed, so after a kill -9 or a power loss it never claims a chunk that is not on
disk; a later `BundleDownloader.download` asks only for the chunks it does not claim. A
bitmap whose length or chunk size differs, or a ``.part`` of the wrong size, starts over.
When every chunk is present the whole file is hashed (the chunks this call wrote in order
from offset 0 are hashed as they are written, the rest is read back); a match is renamed to
``<sha256>.tar``, a mismatch deletes the partial files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import queue
import re
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edge_agent.durable import write_atomic
from edge_agent.protocol.fetch_wire import (
    CHUNK_SIZE,
    FetchAnswer,
    FetchRequest,
    WireError,
    validate_path,
)
from edge_agent.transport import MqttTransport
from edge_agent.update.errors import Reason, TransferError
from edge_agent.update.requests import AnswerRouter, new_request_id

Progress = Callable[[int, int], None]

FLUSH_CHUNKS: Final = 64  # persist the bitmap after this many new chunks ...
FLUSH_INTERVAL_S: Final = 0.5  # ... or this long after the last flush
WRITE_CHUNKS: Final = 16  # accepted chunks are written in batches of this many (1 MiB)
PROGRESS_INTERVAL_S: Final = 0.25
_BITMAP_MAGIC: Final = b"EFB1"
_BITMAP_HEADER: Final = struct.Struct(">4sQI")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_NO_SPACE: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_HASH_BLOCK: Final = 1 << 20
_MAX_IOV: Final = 256  # buffers per pwritev, well under IOV_MAX


@dataclass(slots=True)
class TransferStats:
    """Counters of one `BundleDownloader.download` call (a bench reads the re-fetched share)."""

    resumed_bytes: int = 0  # already on disk (claimed by the bitmap) when the call started
    requests_sent: int = 0
    bytes_requested: int = 0
    retries: int = 0  # requests sent again after a timeout
    chunks_received: int = 0  # accepted and written
    bytes_received: int = 0
    ignored_answers: int = 0  # duplicates, late answers, wrong offset or size
    bitmap_flushes: int = 0


class _Chunks:
    """Which chunks of a file are on disk."""

    def __init__(self, length: int, bits: bytearray | None = None) -> None:
        self.length = length
        self.count = -(-length // CHUNK_SIZE)
        self.bits = bits if bits is not None else bytearray(-(-self.count // 8))

    def has(self, index: int) -> bool:
        return bool(self.bits[index >> 3] & (1 << (index & 7)))

    def add(self, index: int) -> None:
        self.bits[index >> 3] |= 1 << (index & 7)

    def size(self, index: int) -> int:
        return min(CHUNK_SIZE, self.length - index * CHUNK_SIZE)

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if not self.has(i)]

    def present_bytes(self) -> int:
        return sum(self.size(i) for i in range(self.count) if self.has(i))

    def encode(self) -> bytes:
        return _BITMAP_HEADER.pack(_BITMAP_MAGIC, self.length, CHUNK_SIZE) + bytes(self.bits)

    @classmethod
    def decode(cls, data: bytes, length: int | None = None) -> _Chunks | None:
        """The bitmap in `data`, or None if it is malformed or for another length/chunk size."""
        if len(data) < _BITMAP_HEADER.size:
            return None
        magic, stored_length, chunk_size = _BITMAP_HEADER.unpack_from(data)
        if magic != _BITMAP_MAGIC or chunk_size != CHUNK_SIZE:
            return None
        if length is not None and stored_length != length:
            return None
        chunks = cls(stored_length)
        bits = data[_BITMAP_HEADER.size :]
        if len(bits) != len(chunks.bits) or any(
            bits[i >> 3] & (1 << (i & 7)) for i in range(chunks.count, len(bits) * 8)
        ):
            return None
        chunks.bits[:] = bits
        return chunks


class _PartFile:
    """``<sha256>.part`` and ``<sha256>.bitmap``: chunk writes and crash-safe bookkeeping."""

    def __init__(self, work_dir: Path, sha256: str, length: int) -> None:
        self.path = work_dir / f"{sha256}.part"
        self.bitmap_path = work_dir / f"{sha256}.bitmap"
        self.chunks = _Chunks(length)
        self._fd = -1
        # The file's hash so far: chunks written in order from offset 0 are hashed from
        # memory as they are written; `sha256` reads only what lies beyond from disk.
        self._digest = hashlib.sha256()
        self._hashed = 0
        self.unflushed = 0
        self.flushed_at = time.monotonic()

    def open(self) -> None:
        """Open or create the part, preallocated; keep the bitmap only if it still fits.

        Raises:
            TransferError: DISK_FULL (partial files removed).
            RuntimeError: another process is downloading the same file.
        """
        length = self.chunks.length
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"{self.path} is being downloaded by another process") from None
        self._fd = fd
        stored = _read_bitmap(self.bitmap_path, length)
        if stored is not None and os.fstat(fd).st_size == length:
            self.chunks = stored
        else:
            # A stale bitmap must not survive a crash that follows the restart.
            self._remove_bitmap()
            os.ftruncate(fd, 0)
        try:
            if length:
                os.posix_fallocate(fd, 0, length)
        except OSError as e:
            self._fail_on_full_disk(e)
            self.close()
            raise

    def write_many(self, received: list[tuple[int, bytes]]) -> None:
        """Write chunks ``(index, data)`` (each already checked to be the right size) at
        their offsets: one ``pwritev`` per run of adjacent chunks, as a syscall releases
        the GIL and winning it back costs more than the copy."""
        received.sort(key=lambda item: item[0])
        start = 0
        try:
            while start < len(received):
                end = start + 1
                while (
                    end < len(received)
                    and end - start < _MAX_IOV
                    and received[end][0] == received[end - 1][0] + 1
                ):
                    end += 1
                buffers = [data for _, data in received[start:end]]
                offset = received[start][0] * CHUNK_SIZE
                _pwrite_all(self._fd, buffers, offset)
                if offset == self._hashed:
                    # One update per run: each call releases and re-takes the GIL.
                    run = buffers[0] if len(buffers) == 1 else b"".join(buffers)
                    self._digest.update(run)
                    self._hashed += len(run)
                # Only what is written may be claimed by a later flush.
                for index, _ in received[start:end]:
                    self.chunks.add(index)
                self.unflushed += end - start
                start = end
        except OSError as e:
            self._fail_on_full_disk(e)
            raise

    def flush(self) -> bool:
        """Make the data durable, then the bitmap that claims it. True if anything was new."""
        if not self.unflushed:
            return False
        try:
            os.fdatasync(self._fd)
            write_atomic(self.bitmap_path, self.chunks.encode())
        except OSError as e:
            self._fail_on_full_disk(e)
            raise
        self.unflushed = 0
        self.flushed_at = time.monotonic()
        return True

    def sha256(self) -> str:
        digest = self._digest.copy()
        offset = self._hashed
        while offset < self.chunks.length:
            block = os.pread(self._fd, min(_HASH_BLOCK, self.chunks.length - offset), offset)
            if not block:
                break
            digest.update(block)
            offset += len(block)
        return digest.hexdigest()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        self._remove_bitmap()

    def _remove_bitmap(self) -> None:
        self.bitmap_path.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)

    def _fail_on_full_disk(self, error: OSError) -> None:
        if error.errno in _NO_SPACE:
            self.remove()
            raise TransferError(
                Reason.DISK_FULL,
                f"no space for {self.chunks.length} bytes in {self.path.parent}: {error}",
            ) from error


@dataclass(slots=True)
class _Pending:
    index: int
    expires: float
    attempt: int


class BundleDownloader:
    """Download target files over MQTT into `work_dir`, resuming what earlier calls left.

    Args:
        transport: a started transport (it may still be connecting).
        device_id: whose ``fetch``/``data`` topics to use (shared with `MqttFetcher`).
        work_dir: where ``<sha256>.part``, ``.bitmap`` and the finished ``.tar`` live.
        window: chunk requests in flight at once.
        request_timeout_s: how long one request waits for its answer before it is sent
            again with a fresh correlation id.
        retries: further attempts per chunk after a timeout.
        min_bytes_per_s, min_deadline_s: the bytes still missing must arrive within
            ``max(min_deadline_s, missing / min_bytes_per_s)`` seconds.
        logger: where refused answers and retries are logged (debug).

    One download per sha256 at a time (a second process gets a RuntimeError); an instance
    is not meant to be shared between threads. `stats` holds the last call's counters.

    Raises:
        ValueError: invalid device id, window, timeouts or throughput.
    """

    def __init__(
        self,
        transport: MqttTransport,
        device_id: str,
        work_dir: Path,
        *,
        window: int = 32,
        request_timeout_s: float = 2.0,
        retries: int = 5,
        min_bytes_per_s: float = 64 * 1024,
        min_deadline_s: float = 10.0,
        logger: logging.Logger | None = None,
    ) -> None:
        if window < 1 or request_timeout_s <= 0 or retries < 0:
            raise ValueError("need window >= 1, request_timeout_s > 0, retries >= 0")
        if min_bytes_per_s <= 0 or min_deadline_s <= 0:
            raise ValueError("throughput and deadline must be positive")
        self._router = AnswerRouter.shared(transport, device_id)
        self._work_dir = work_dir
        self._window = window
        self._request_timeout_s = request_timeout_s
        self._retries = retries
        self._min_bytes_per_s = min_bytes_per_s
        self._min_deadline_s = min_deadline_s
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self.stats = TransferStats()

    def download(
        self, target_path: str, length: int, sha256: str, progress: Progress | None = None
    ) -> Path:
        """Fetch ``targets/<target_path>`` and return ``<work_dir>/<sha256>.tar``, verified.

        A file that is already complete and verifies is returned without any request.
        `progress(received_bytes, length)` is called at most every 0.25 s and at the end.

        Raises:
            ValueError: negative length, a sha256 that is not 64 hex digits, a bad path.
            TransferError: TRANSPORT (no answer after retries, or the server refused or
                does not have the file), TOO_SLOW (deadline passed), LENGTH_MISMATCH (the
                server's total differs from `length`): the partial files are kept, a later
                call resumes. HASH_MISMATCH, DISK_FULL: the partial files are removed.
            RuntimeError: another process is downloading the same file.
        """
        if length < 0 or _SHA256_RE.fullmatch(sha256) is None:
            raise ValueError(f"invalid length {length} or sha256 {sha256!r}")
        try:
            wire_path = validate_path(f"targets/{target_path}")
        except WireError as e:
            raise ValueError(str(e)) from e
        self.stats = TransferStats()
        final = self._work_dir / f"{sha256}.tar"
        if _is_complete(final, length, sha256):
            (self._work_dir / f"{sha256}.bitmap").unlink(missing_ok=True)
            if progress is not None:
                progress(length, length)
            return final
        final.unlink(missing_ok=True)
        self._work_dir.mkdir(parents=True, exist_ok=True)
        part = _PartFile(self._work_dir, sha256, length)
        part.open()
        try:
            self.stats.resumed_bytes = part.chunks.present_bytes()
            self._fetch_missing(part, wire_path, progress)
            self.stats.bitmap_flushes += part.flush()
            if part.sha256() != sha256:
                part.remove()
                raise TransferError(
                    Reason.HASH_MISMATCH, f"{wire_path}: sha256 differs from the signed one"
                )
            part.close()
            os.replace(part.path, final)
            _fsync_dir(self._work_dir)
            part.bitmap_path.unlink(missing_ok=True)
        finally:
            # Whatever arrived before a failure is kept for the next call; flush() raises
            # DISK_FULL itself (and removes the files) if even that no longer fits.
            with contextlib.suppress(TransferError):
                if part.path.exists():
                    part.flush()
            part.close()
        if progress is not None:
            progress(length, length)
        return final

    def partial_bytes(self, sha256: str) -> int:
        """Bytes of `sha256`'s file durably on disk: its length once complete, else what the
        bitmap claims (0 when there is nothing or the bitmap is unusable)."""
        if _SHA256_RE.fullmatch(sha256) is None:
            raise ValueError(f"invalid sha256 {sha256!r}")
        final = self._work_dir / f"{sha256}.tar"
        if final.is_file():
            return final.stat().st_size
        chunks = _read_bitmap(self._work_dir / f"{sha256}.bitmap", None)
        part = self._work_dir / f"{sha256}.part"
        if chunks is None or not part.is_file() or part.stat().st_size != chunks.length:
            return 0
        return chunks.present_bytes()

    def discard(self, sha256: str) -> None:
        """Remove the ``.part``, ``.bitmap`` and ``.tar`` of `sha256` (e.g. once installed)."""
        if _SHA256_RE.fullmatch(sha256) is None:
            raise ValueError(f"invalid sha256 {sha256!r}")
        for suffix in (".part", ".bitmap", ".tar"):
            (self._work_dir / f"{sha256}{suffix}").unlink(missing_ok=True)

    def _fetch_missing(self, part: _PartFile, wire_path: str, progress: Progress | None) -> None:
        chunks = part.chunks
        todo = deque(chunks.missing())
        received = chunks.length - sum(chunks.size(i) for i in todo)
        started = time.monotonic()
        budget = max(self._min_deadline_s, (chunks.length - received) / self._min_bytes_per_s)
        deadline = started + budget
        answers: queue.SimpleQueue[FetchAnswer] = queue.SimpleQueue()
        inflight: dict[str, _Pending] = {}
        reported = started

        def send(index: int, attempt: int) -> None:
            request_id = new_request_id()
            size = chunks.size(index)
            inflight[request_id] = _Pending(
                index, time.monotonic() + self._request_timeout_s, attempt
            )
            self._router.register(request_id, answers.put)
            self.stats.requests_sent += 1
            self.stats.bytes_requested += size
            if not self._router.send(FetchRequest(request_id, wire_path, index * CHUNK_SIZE, size)):
                self._logger.debug("request for %s chunk %d not queued (offline)", wire_path, index)

        def refill() -> None:
            while todo and len(inflight) < self._window:
                send(todo.popleft(), 0)

        # Accepted chunks wait here for one write per run of adjacent chunks; only written
        # chunks can be claimed by the bitmap.
        unwritten: list[tuple[int, bytes]] = []

        def write_unwritten() -> None:
            if not unwritten:
                return
            part.write_many(unwritten)
            self.stats.chunks_received += len(unwritten)
            self.stats.bytes_received += sum(len(data) for _, data in unwritten)
            unwritten.clear()

        try:
            while todo or inflight:
                refill()
                now = time.monotonic()
                if now >= deadline:
                    raise TransferError(
                        Reason.TOO_SLOW,
                        f"{wire_path}: {received} of {chunks.length} bytes after "
                        f"{now - started:.1f} s (budget {budget:.1f} s); resumable",
                    )
                wake = min(deadline, *(p.expires for p in inflight.values()))
                # Everything that has arrived is handled as one batch: the requests that
                # replace it go out first, then one write per run of adjacent chunks.
                arrived: list[FetchAnswer] = []
                try:
                    arrived.append(answers.get(timeout=max(wake - now, 0.0)))
                    while len(arrived) < self._window:
                        arrived.append(answers.get_nowait())
                except queue.Empty:
                    pass
                for answer in arrived:
                    chunk = self._accept(answer, inflight, part, wire_path)
                    if chunk is not None:
                        unwritten.append(chunk)
                        received += len(chunk[1])
                refill()
                if len(unwritten) >= WRITE_CHUNKS or not (todo or inflight):
                    write_unwritten()
                now = time.monotonic()
                for request_id, pending in list(inflight.items()):
                    if pending.expires > now:
                        continue
                    self._router.unregister(request_id)
                    del inflight[request_id]
                    if pending.attempt >= self._retries:
                        raise TransferError(
                            Reason.TRANSPORT,
                            f"{wire_path}: no answer for the chunk at "
                            f"{pending.index * CHUNK_SIZE} after {1 + self._retries} attempts",
                        )
                    self.stats.retries += 1
                    send(pending.index, pending.attempt + 1)
                if part.unflushed >= FLUSH_CHUNKS or (
                    part.unflushed and now - part.flushed_at >= FLUSH_INTERVAL_S
                ):
                    self.stats.bitmap_flushes += part.flush()
                if progress is not None and now - reported >= PROGRESS_INTERVAL_S:
                    reported = now
                    progress(received, chunks.length)
        finally:
            for request_id in inflight:
                self._router.unregister(request_id)
            # Chunks accepted before a failure are kept for a later call.
            write_unwritten()

    def _accept(
        self,
        answer: FetchAnswer,
        inflight: dict[str, _Pending],
        part: _PartFile,
        wire_path: str,
    ) -> tuple[int, bytes] | None:
        """Check one answer against its request; ``(chunk index, data)`` to write if it
        brings a chunk that is neither on disk nor already accepted, else None.

        Raises:
            TransferError: TRANSPORT for a refusal, LENGTH_MISMATCH for a wrong total.
        """
        pending = inflight.get(answer.id)
        if pending is None:  # answered already (a duplicate), or expired
            self.stats.ignored_answers += 1
            return None
        if answer.status == "not_found":
            raise TransferError(Reason.TRANSPORT, f"the server does not have {wire_path}")
        if answer.status != "ok":
            raise TransferError(
                Reason.TRANSPORT, f"the server refused the request for {wire_path}: {answer.status}"
            )
        chunks = part.chunks
        if answer.total != chunks.length:
            raise TransferError(
                Reason.LENGTH_MISMATCH,
                f"the server says {wire_path} has {answer.total} bytes, signed: {chunks.length}",
            )
        offset = pending.index * CHUNK_SIZE
        if answer.offset != offset or len(answer.data) != chunks.size(pending.index):
            # Left pending: it times out and is asked for again.
            self.stats.ignored_answers += 1
            self._logger.debug(
                "ignoring %d bytes at %d for %s, asked for the chunk at %d",
                len(answer.data),
                answer.offset,
                wire_path,
                offset,
            )
            return None
        self._router.unregister(answer.id)
        del inflight[answer.id]
        # A chunk has one request in flight at a time (a retry drops the old id first),
        # so within a batch no index is accepted twice.
        if chunks.has(pending.index):
            self.stats.ignored_answers += 1
            return None
        return pending.index, answer.data


def _read_bitmap(path: Path, length: int | None) -> _Chunks | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return _Chunks.decode(data, length)


def _is_complete(path: Path, length: int, sha256: str) -> bool:
    try:
        if path.stat().st_size != length:
            return False
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
    except FileNotFoundError:
        return False
    return digest.hexdigest() == sha256


def _pwrite_all(fd: int, buffers: list[bytes], offset: int) -> None:
    """Write `buffers` back to back at `offset`, however many calls that takes."""
    written = os.pwritev(fd, buffers, offset)
    for buffer in buffers:
        if written >= len(buffer):
            written -= len(buffer)
            offset += len(buffer)
            continue
        view = memoryview(buffer)[written:]
        offset += written
        written = 0
        while view:
            done = os.pwrite(fd, view, offset)
            view = view[done:]
            offset += done


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
