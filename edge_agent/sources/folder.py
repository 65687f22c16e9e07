"""A hot folder: image files dropped into ``inbox`` are inspected exactly once.

Contract:

* Only regular files directly in ``inbox`` whose names end with one of ``extensions``
  (case-insensitive) are considered; dotfiles and ``*.tmp`` / ``*.part`` files (what
  writers use while copying) and symlinks are ignored.
* A file is complete once its size and mtime have not changed for ``settle_s`` seconds,
  observed by polling with ``os.scandir`` (portable, works on network mounts). A file that
  appeared by an atomic rename cannot be told apart from one being written, so it waits
  ``settle_s`` too. Complete files are handed out oldest mtime first, then by name.
* Each yields ``Frame(frame_id, timestamp=mtime, source=name, data=bytes, key=key)`` with
  ``key = f"{name}:{size}:{mtime_ns}"``. The bytes are checked to be exactly the settled
  file (same size and mtime before and after reading); a file that changed settles again.
* ``ack`` moves the file to ``inbox/done/`` (pass, fail, uncertain) or ``inbox/error/``
  (error) with ``os.replace`` and fsyncs both directories. A name clash in the target gets
  a ``~N`` suffix instead of overwriting. Moves assume this agent is the only writer of
  ``done/`` and ``error/``.
* Restart: files in ``done/`` and ``error/`` are never seen again. A file still in the
  inbox whose key ``is_recorded`` reports (verdict stored, crash before the move) is moved
  to ``done/`` without being yielded; a file whose verdict was not stored is yielded again.
* Files that vanish before they are read are skipped with one warning and counted in
  ``counters.errors``; files larger than ``max_bytes`` or unreadable go to ``error/`` with
  the reason in ``error/<name>.reason.txt``. Iteration never raises for file problems.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_agent.core.decode import DEFAULT_MAX_BYTES
from edge_agent.core.frame import Frame
from edge_agent.durable import fsync_dir, write_atomic
from edge_agent.sources.base import SourceCounters

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DONE_DIR = "done"
ERROR_DIR = "error"
REASON_SUFFIX = ".reason.txt"
_IGNORED_SUFFIXES = (".tmp", ".part")
_DONE_OUTCOMES = frozenset({"pass", "fail", "uncertain"})
_OUTCOMES = _DONE_OUTCOMES | {"error"}


@dataclass(frozen=True, slots=True)
class _File:
    """One file as listed: enough to read it and to name its content."""

    name: str
    path: Path
    ident: tuple[int, int]  # (size, mtime_ns)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.ident[0]}:{self.ident[1]}"

    def same_as(self, st: os.stat_result) -> bool:
        """True when ``st`` is still this regular file (same size and mtime)."""
        return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == self.ident


class FolderSource:
    """Yields each complete image file in ``inbox`` once; ``ack`` moves it away.

    ``stop_when_empty=True`` ends iteration once no unyielded complete file is left and
    no file is settling (batch use, tests); otherwise iteration runs until ``close()``,
    which may be called from any thread and takes effect within about ``poll_s``.

    Raises:
        ValueError: ``inbox`` is not a directory, or a limit is out of range.
    """

    def __init__(
        self,
        inbox: Path,
        *,
        settle_s: float = 0.5,
        poll_s: float = 0.2,
        max_bytes: int = DEFAULT_MAX_BYTES,
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
        is_recorded: Callable[[str], bool] | None = None,
        stop_when_empty: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        if not inbox.is_dir():
            raise ValueError(f"hot folder {inbox} is not a directory")
        if settle_s < 0 or poll_s <= 0 or max_bytes <= 0:
            raise ValueError("settle_s must be >= 0, poll_s and max_bytes > 0")
        self.inbox = inbox
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.max_bytes = max_bytes
        self.extensions = tuple(e.lower() for e in extensions)
        self.is_recorded = is_recorded
        self.stop_when_empty = stop_when_empty
        self.log = logger or logging.getLogger(__name__)
        self._counters = SourceCounters()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the in-flight maps (ack runs on another thread)
        self._next_id = 0
        self._in_flight: dict[int, _File] = {}  # frame_id -> file yielded, not yet acked
        self._in_flight_names: set[str] = set()
        # Scanner thread only: name -> ((size, mtime_ns), monotonic time first seen so).
        self._watch: dict[str, tuple[tuple[int, int], float]] = {}
        # Files that could not be moved to error/: skipped until they change.
        self._given_up: dict[str, tuple[int, int]] = {}
        self._inbox_ok = True

    @property
    def name(self) -> str:
        return f"folder:{self.inbox}"

    @property
    def live(self) -> bool:
        """False: files wait for the pipeline (back-pressure), none is dropped."""
        return False

    @property
    def counters(self) -> SourceCounters:
        return self._counters

    def close(self) -> None:
        """End iteration within about ``poll_s``; safe from any thread, never raises."""
        self._stop.set()

    def __iter__(self) -> Iterator[Frame]:
        """Yield complete files as frames. Raises only what ``is_recorded`` raises."""
        while not self._stop.is_set():
            ready, settling = self._scan(time.monotonic())
            for file in ready:
                if self._stop.is_set():
                    return
                frame = self._take(file)
                if frame is not None:
                    yield frame
            if not ready:
                if self.stop_when_empty and not settling:
                    return
                self._stop.wait(self.poll_s)

    def ack(self, frame: Frame, outcome: str) -> None:
        """Move the frame's file to ``done/`` or ``error/`` (for outcome ``error``).

        File-system problems are logged and counted, never raised. A file that changed
        since it was read stays in the inbox and is inspected again as new content.

        Raises:
            ValueError: ``outcome`` is not pass, fail, uncertain or error (caller bug).
        """
        if outcome not in _OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        with self._lock:
            file = self._in_flight.pop(frame.frame_id, None)
        if file is None:
            self.log.warning("ack for a frame not in flight", extra={"event": "folder_ack_unknown"})
            return
        try:
            st = os.stat(file.path, follow_symlinks=False)
            if not file.same_as(st):
                self._warn(file, "file changed after it was read; it will be inspected again")
            else:
                self._move(file.path, DONE_DIR if outcome in _DONE_OUTCOMES else ERROR_DIR)
        except FileNotFoundError as e:
            self._warn(file, "file vanished before ack", e)
        except OSError as e:
            # The name stays in flight: not retried by this process (no log storm); after a
            # restart is_recorded sends the file to done/.
            self._warn(file, "cannot move acknowledged file", e)
            return
        with self._lock:
            self._in_flight_names.discard(file.name)

    # -- scanning -------------------------------------------------------------------------

    def _wanted(self, name: str) -> bool:
        lower = name.lower()
        return (
            not name.startswith(".")
            and not lower.endswith(_IGNORED_SUFFIXES)
            and lower.endswith(self.extensions)
        )

    def _list(self) -> list[_File]:
        files: list[_File] = []
        try:
            with os.scandir(self.inbox) as it:
                for entry in it:
                    if not self._wanted(entry.name):
                        continue
                    try:
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # gone between listing and stat: nothing to inspect
                    ident = st.st_size, st.st_mtime_ns
                    files.append(_File(entry.name, Path(entry.path), ident))
        except OSError as e:  # e.g. a network mount went away; keep polling, log once
            if self._inbox_ok:
                extra = {"event": "folder_list_failed", "error": str(e)}
                self.log.warning("cannot list hot folder", extra=extra)
            self._inbox_ok = False
            return []
        self._inbox_ok = True
        return files

    def _scan(self, now: float) -> tuple[list[_File], bool]:
        """Complete files (oldest first), and whether any file is still settling."""
        with self._lock:
            in_flight = set(self._in_flight_names)
        ready: list[_File] = []
        settling = False
        files = self._list()
        for file in files:
            ident = file.ident
            if file.name in in_flight:
                self._watch.pop(file.name, None)  # settle afresh if it comes back
                continue
            if self._given_up.get(file.name) == ident:
                continue
            seen = self._watch.get(file.name)
            if seen is None or seen[0] != ident:
                self._watch[file.name] = (ident, now)
                if self.settle_s > 0:
                    settling = True
                    continue
            elif now - seen[1] < self.settle_s:
                settling = True
                continue
            ready.append(file)
        present = {f.name for f in files}
        self._watch = {k: v for k, v in self._watch.items() if k in present}
        self._given_up = {k: v for k, v in self._given_up.items() if k in present}
        ready.sort(key=lambda f: (f.ident[1], f.name))
        return ready, settling

    def _take(self, file: _File) -> Frame | None:
        """The frame for a complete file, or None when it was handled another way."""
        key = file.key
        if self.is_recorded is not None and self.is_recorded(key):
            self.log.info(
                "verdict already stored; moving file to done/",
                extra={"event": "folder_already_recorded", "file": file.name},
            )
            try:
                self._move(file.path, DONE_DIR)
            except OSError as e:
                self._warn(file, "cannot move recorded file to done/", e)
                self._given_up[file.name] = file.ident
            return None
        if file.ident[0] > self.max_bytes:
            self._reject(file, f"file too large ({file.ident[0]} bytes > {self.max_bytes})")
            return None
        try:
            data = self._read(file)
        except FileNotFoundError as e:
            self._warn(file, "file vanished before it was read", e)
            return None
        except OSError as e:
            self._reject(file, f"cannot read file ({e.strerror or type(e).__name__})")
            return None
        if data is None:  # changed since it settled: settle again
            self._watch.pop(file.name, None)
            return None
        with self._lock:
            frame_id = self._next_id
            self._next_id += 1
            self._in_flight[frame_id] = file
            self._in_flight_names.add(file.name)
        self._counters.frames += 1
        return Frame(frame_id, file.ident[1] / 1e9, self.name, data=data, key=key)

    def _read(self, file: _File) -> bytes | None:
        """The file's bytes if it is still exactly the listed file, else None.

        Raises:
            OSError: the file cannot be opened or read (FileNotFoundError if it is gone).
        """
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
        with os.fdopen(os.open(file.path, flags), "rb") as f:
            if not file.same_as(os.fstat(f.fileno())):
                return None
            data = f.read(self.max_bytes + 1)  # bounded even if the file grows meanwhile
            unchanged = file.same_as(os.fstat(f.fileno()))
        return data if unchanged and len(data) == file.ident[0] else None

    # -- moving ---------------------------------------------------------------------------

    def _warn(self, file: _File, msg: str, err: OSError | None = None) -> None:
        """One warning line; a failure (``err``) is also counted in ``errors``."""
        extra: dict[str, object] = {"event": "folder_file_problem", "file": file.name}
        if err is not None:
            self._counters.errors += 1
            extra["error"] = str(err)
        self.log.warning(msg, extra=extra)

    def _reject(self, file: _File, reason: str) -> None:
        """Move a file that cannot be inspected to ``error/`` with a reason sidecar."""
        self._counters.errors += 1
        self.log.warning(
            "file moved to error/",
            extra={"event": "folder_rejected", "file": file.name, "reason": reason},
        )
        try:
            dest = self._move(file.path, ERROR_DIR)
            write_atomic(dest.with_name(dest.name + REASON_SUFFIX), (reason + "\n").encode())
        except OSError as e:
            self._warn(file, "cannot move rejected file to error/", e)
            self._given_up[file.name] = file.ident

    def _move(self, path: Path, target: str) -> Path:
        """Atomically move ``path`` into ``inbox/<target>/`` without overwriting; fsync both
        directories so the move survives power loss. Returns the new path.

        Raises:
            OSError: the move failed (the file is where it was).
        """
        dest_dir = self.inbox / target
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / path.name
        stem, suffix = os.path.splitext(path.name)
        n = 0
        while dest.exists() or dest.with_name(dest.name + REASON_SUFFIX).exists():
            n += 1
            dest = dest_dir / f"{stem}~{n}{suffix}"
        os.replace(path, dest)
        fsync_dir(dest_dir)
        fsync_dir(self.inbox)
        return dest
