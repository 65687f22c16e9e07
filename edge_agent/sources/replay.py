"""Replay a directory of images or a video file as a frame source.

Contract:

* A directory yields its image files (not subfolders; dotfiles ignored) sorted by name,
  as encoded bytes (``Frame.data``); decoding happens later in the pipeline, so a corrupt
  file becomes an ``error`` verdict there. A file that cannot be read at all (removed,
  no permission, larger than ``max_bytes``) is skipped with a warning and counted in
  ``counters.errors``. ``Frame.source`` is the file name.
* Any other file is read with ``cv2.VideoCapture`` and yields decoded BGR images
  (``Frame.image``); ``Frame.source`` is ``"<file name>#<frame index>"``.
* ``realtime=True`` paces frames at ``fps`` (a video's own frame rate unless ``fps`` is
  given); ``realtime=False`` yields as fast as the consumer takes frames and ``fps`` is
  ignored. ``loop=True`` starts over at the end; frame ids keep increasing.
* Problems with ``path`` are found at construction (``ValueError`` naming the path), not
  in the middle of iteration. ``close()`` may be called from any thread.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from edge_agent.core.decode import DEFAULT_MAX_BYTES
from edge_agent.core.frame import Frame
from edge_agent.sources.base import SourceCounters

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ReplaySource:
    """Frames from a directory of images (sorted by name) or a video file.

    Raises:
        ValueError: ``path`` does not exist, is a directory without images, or is a video
            that OpenCV cannot open; ``fps`` is not positive; ``realtime=True`` without a
            usable frame rate (a directory needs ``fps``; a video without its own rate too).
    """

    def __init__(
        self,
        path: Path,
        *,
        fps: float | None = None,
        realtime: bool = False,
        loop: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
        logger: logging.Logger | None = None,
    ) -> None:
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, not {fps}")
        self.path = path
        self.realtime = realtime
        self.loop = loop
        self.max_bytes = max_bytes
        self.log = logger or logging.getLogger(__name__)
        self._counters = SourceCounters()
        self._stop = threading.Event()
        self._files: list[Path] = []
        if path.is_dir():
            self._files = _list_images(path)
            if not self._files:
                raise ValueError(
                    f"replay directory {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
                )
            if realtime and fps is None:
                raise ValueError(f"replaying directory {path} in real time needs fps")
            self.fps = fps
        elif path.is_file():
            native = _probe_video(path)
            if realtime and fps is None and native is None:
                raise ValueError(f"video {path} has no frame rate; realtime replay needs fps")
            self.fps = fps if fps is not None else native
        else:
            raise ValueError(f"replay path {path} does not exist")

    @property
    def name(self) -> str:
        return f"replay:{self.path}"

    @property
    def live(self) -> bool:
        """False: replayed frames wait for the pipeline; none is dropped."""
        return False

    @property
    def counters(self) -> SourceCounters:
        return self._counters

    def ack(self, frame: Frame, outcome: str) -> None:
        """Nothing to do: replayed inputs are left where they are."""

    def close(self) -> None:
        """End iteration soon (before the next frame); safe from any thread."""
        self._stop.set()

    def __iter__(self) -> Iterator[Frame]:
        period = 1.0 / self.fps if self.realtime and self.fps else 0.0
        next_due = time.monotonic()
        frame_id = 0
        while not self._stop.is_set():
            produced = 0
            frames = self._directory_pass() if self._files else self._video_pass()
            for source, payload in frames:
                if period:
                    delay = next_due - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return
                    # Falling behind by more than a frame resets the schedule (no burst).
                    next_due = max(next_due + period, time.monotonic() - period)
                if self._stop.is_set():
                    return
                self._counters.frames += 1
                produced += 1
                if isinstance(payload, bytes):
                    yield Frame(frame_id, time.time(), source, data=payload)
                else:
                    yield Frame(frame_id, time.time(), source, image=payload)
                frame_id += 1
            if not self.loop:
                return
            if produced == 0:  # every file vanished: looping would spin forever
                self.log.warning(
                    "replay produced no frame in a whole pass; stopping",
                    extra={"event": "replay_empty_pass", "path": str(self.path)},
                )
                return

    def _directory_pass(self) -> Iterator[tuple[str, bytes | npt.NDArray[np.uint8]]]:
        for file in self._files:
            try:
                data = _read_bounded(file, self.max_bytes)
            except OSError as e:
                self._counters.errors += 1
                self.log.warning(
                    "cannot read replay file; skipped",
                    extra={"event": "replay_unreadable", "file": str(file), "error": str(e)},
                )
                continue
            yield file.name, data

    def _video_pass(self) -> Iterator[tuple[str, bytes | npt.NDArray[np.uint8]]]:
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                self._counters.errors += 1
                self.log.warning(
                    "cannot reopen replay video",
                    extra={"event": "replay_unreadable", "file": str(self.path)},
                )
                return
            index = 0
            while not self._stop.is_set():
                ok, image = cap.read()
                if not ok or image is None:
                    return
                if image.ndim == 2:
                    image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
                yield f"{self.path.name}#{index}", np.ascontiguousarray(image, dtype=np.uint8)
                index += 1
        finally:
            cap.release()


def _list_images(directory: Path) -> list[Path]:
    files = []
    with os.scandir(directory) as it:
        for entry in it:
            name = entry.name
            wanted = not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
            if wanted and entry.is_file():
                files.append(Path(entry.path))
    return sorted(files, key=lambda p: p.name)


def _probe_video(path: Path) -> float | None:
    """The video's own frame rate (None if it declares none).

    Raises:
        ValueError: OpenCV cannot open the file or read its first frame.
    """
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"cannot open video {path} (not a video, or no codec for it)")
        ok, _ = cap.read()
        if not ok:
            raise ValueError(f"video {path} has no readable frame")
        fps = float(cap.get(cv2.CAP_PROP_FPS))
    finally:
        cap.release()
    return fps if math.isfinite(fps) and fps > 0 else None


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    """Read at most ``max_bytes`` bytes.

    Raises:
        OSError: cannot open or read the file, or it is larger than ``max_bytes``.
    """
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    with os.fdopen(os.open(path, flags), "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(f"file larger than {max_bytes} bytes")
    return data
