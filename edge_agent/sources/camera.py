"""A live camera through OpenCV: a V4L2 device, an RTSP/HTTP stream or a GStreamer pipeline.

The camera is expected to fail: a stream server restarts, a USB cable is pulled. The
source then logs one warning, releases the capture and reconnects with exponential
backoff until it is closed; iteration never raises for a camera that is gone.

Loss accounting is an estimate. A failed read while connected is one lost frame. During
an outage (from the last delivered frame to the next one) with a known frame rate, the
frames the camera would have sent in the dark are counted: ``round(dark_s * fps)`` so far,
``round(gap_s * fps) - 1`` once the next frame arrives (the next frame itself is not lost).
The frame rate is the ``fps`` argument when given, else what OpenCV reports after opening
(a container default for some streams: MJPEG over HTTP says 25 whatever the camera sends).
Without either, only failed reads are counted.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import cv2
import numpy as np
import numpy.typing as npt

from edge_agent.core.frame import Frame
from edge_agent.sources.base import SourceCounters

# A connection is given up after this many failed reads in a row, or after read_timeout_s
# without a frame (a stalled RTSP stream blocks each read for the whole timeout).
MAX_FAILED_READS = 5
# Frame rates OpenCV reports outside this range are placeholders (RTP/JPEG says 90000).
PLAUSIBLE_FPS = (0.5, 240.0)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential reconnect delays: ``initial_s`` after the first failure, doubling, capped."""

    initial_s: float
    max_s: float

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` (>= 1) consecutive failed connections."""
        return min(self.max_s, self.initial_s * 2.0 ** max(0, failures - 1))


@dataclass(slots=True)
class LossEstimate:
    """Frames lost in outages (see the module docstring); each call returns the increment."""

    last_frame: float  # monotonic time of the last delivered frame (or of the start)
    fps: float | None = None
    failed_reads: int = 0  # in the current outage
    counted: int = 0  # already reported for the current outage
    in_outage: bool = False

    def failed_read(self, now: float) -> int:
        self.failed_reads += 1
        return self._report(now, frame_arrived=False)

    def failed_open(self, now: float) -> int:
        return self._report(now, frame_arrived=False)

    def delivered(self, now: float) -> int:
        lost = self._report(now, frame_arrived=True) if self.in_outage else 0
        self.last_frame, self.failed_reads, self.counted, self.in_outage = now, 0, 0, False
        return lost

    def _report(self, now: float, *, frame_arrived: bool) -> int:
        self.in_outage = True
        estimate = self.failed_reads
        if self.fps is not None:
            dark = round((now - self.last_frame) * self.fps) - (1 if frame_arrived else 0)
            estimate = max(estimate, dark)
        increment = max(0, estimate - self.counted)
        self.counted += increment
        return increment


def connection_lost(failed_reads: int, dark_s: float, read_timeout_s: float) -> bool:
    """Whether consecutive failed reads mean the camera is gone rather than one bad frame."""
    return failed_reads >= MAX_FAILED_READS or (failed_reads > 0 and dark_s >= read_timeout_s)


def redact(target: str) -> str:
    """The target without a password, for logs and frame sources."""
    parts = urlsplit(target) if "://" in target else None
    if parts is None or parts.password is None:
        return target
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


class CameraSource:
    """Frames from one camera as decoded BGR ``uint8`` images with increasing ``frame_id``.

    ``target``: a V4L2 device (``/dev/video0`` or ``0``), an ``rtsp://``/``http://`` URL
    (opened with FFmpeg; ``open_timeout_s``/``read_timeout_s`` bound every blocking call),
    or a GStreamer pipeline (contains ``!``). ``width``/``height``/``fps``/``fourcc`` are
    requested from V4L2 devices; ``fps`` also drives the loss estimate.

    Raises ``ValueError`` for a GStreamer pipeline when OpenCV was built without GStreamer,
    and for a ``fourcc`` that is not four characters. Iteration itself does not raise.
    ``close()`` from any thread ends iteration within about a second, or when a blocked
    OpenCV call returns (at most the open or read timeout), and releases the capture.
    """

    live = True

    def __init__(
        self,
        target: str,
        *,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        fourcc: str | None = None,
        open_timeout_s: float = 5.0,
        read_timeout_s: float = 5.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        logger: logging.Logger | None = None,
    ) -> None:
        if "!" in target and not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
            raise ValueError("a GStreamer pipeline needs OpenCV built with GStreamer")
        if fourcc is not None and len(fourcc) != 4:
            raise ValueError(f"fourcc must be four characters, got {fourcc!r}")
        self.target = target
        self._shown = redact(target)
        self.width, self.height, self.fps, self.fourcc = width, height, fps, fourcc
        self.open_timeout_s, self.read_timeout_s = open_timeout_s, read_timeout_s
        self.backoff = Backoff(backoff_initial_s, backoff_max_s)
        self.counters = SourceCounters()
        self._log = logger or logging.getLogger(__name__)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # held while OpenCV uses the capture
        self._cap: cv2.VideoCapture | None = None
        self._next_id = 0

    @property
    def name(self) -> str:
        return f"camera:{self._shown}"

    def ack(self, frame: Frame, outcome: str) -> None:
        """Nothing to do: a camera owns no inputs."""

    def close(self) -> None:
        """Make iteration end; release the capture now unless a read is in progress."""
        self._stop.set()
        if self._lock.acquire(blocking=False):
            try:
                self._release()
            finally:
                self._lock.release()

    def __iter__(self) -> Iterator[Frame]:
        loss = LossEstimate(last_frame=time.monotonic(), fps=self.fps)
        failures = 0  # consecutive connections that gave no frame
        try:
            while True:
                opened = self._open()
                if self._stop.is_set():
                    return
                if opened:
                    delivered, reason = yield from self._stream(loss, failures)
                    failures = 0 if delivered else failures
                else:
                    self.counters.lost += loss.failed_open(time.monotonic())
                    reason = "cannot open"
                with self._lock:
                    self._release()
                if self._stop.is_set():
                    return
                failures += 1
                delay = self.backoff.delay(failures)
                if failures == 1:  # one warning per outage; later attempts are info
                    self._log.warning(
                        "camera %s lost: %s; reconnecting in %g s", self._shown, reason, delay
                    )
                else:
                    self._log.info(
                        "camera %s still unavailable (attempt %d): %s; reconnecting in %g s",
                        self._shown,
                        failures,
                        reason,
                        delay,
                    )
                self._stop.wait(delay)
        finally:
            with self._lock:
                self._release()

    def _stream(
        self, loss: LossEstimate, failures: int
    ) -> Generator[Frame, None, tuple[bool, str]]:
        """Yield frames from the open capture until it fails; returns (delivered, why)."""
        if loss.fps is None:
            loss.fps = self._reported_fps()
        connected_at, failed_reads, delivered = time.monotonic(), 0, False
        while True:
            image = self._read()
            now = time.monotonic()
            if self._stop.is_set():
                return delivered, "closed"
            if image is None:
                failed_reads += 1
                self.counters.lost += loss.failed_read(now)
                dark = now - max(connected_at, loss.last_frame)
                if connection_lost(failed_reads, dark, self.read_timeout_s):
                    return delivered, f"{failed_reads} failed read(s) in {dark:.1f} s"
                continue
            if failures and not delivered:
                self.counters.reconnects += 1
                self._log.info("camera %s reconnected after %d attempt(s)", self._shown, failures)
            failed_reads, delivered = 0, True
            self.counters.lost += loss.delivered(now)
            self.counters.frames += 1
            self._next_id += 1
            yield Frame(self._next_id - 1, time.time(), self.name, image=image)

    def _open(self) -> bool:
        """Open the capture under the lock; False when the camera cannot be opened."""
        with self._lock:
            if self._stop.is_set():
                return False
            try:
                self._cap = self._create_capture()
            except cv2.error as e:
                self._log.debug("camera %s: OpenCV error on open: %s", self._shown, e)
                return False
            if not self._cap.isOpened():
                self._release()
                return False
            return True

    def _create_capture(self) -> cv2.VideoCapture:
        if "!" in self.target:
            return cv2.VideoCapture(self.target, cv2.CAP_GSTREAMER)
        if "://" in self.target:
            ms = (round(self.open_timeout_s * 1000), round(self.read_timeout_s * 1000))
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms[0], cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms[1]]
            return cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, params)
        device = re.fullmatch(r"(?:/dev/video)?(\d+)", self.target)
        cap = cv2.VideoCapture(int(device[1]) if device else self.target, cv2.CAP_V4L2)
        # FOURCC first: V4L2 picks the sizes and rates the pixel format offers.
        if self.fourcc is not None:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*self.fourcc))
        for prop, value in (
            (cv2.CAP_PROP_FRAME_WIDTH, self.width),
            (cv2.CAP_PROP_FRAME_HEIGHT, self.height),
            (cv2.CAP_PROP_FPS, self.fps),
        ):
            if value is not None:
                cap.set(prop, float(value))
        return cap

    def _read(self) -> npt.NDArray[np.uint8] | None:
        """One decoded BGR frame, or None for an empty or failed read."""
        with self._lock:
            if self._cap is None or self._stop.is_set():
                return None
            try:
                ok, image = self._cap.read()
            except cv2.error as e:
                self._log.debug("camera %s: OpenCV error on read: %s", self._shown, e)
                return None
        if not ok or image is None or image.size == 0:
            return None
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        return np.asarray(image, dtype=np.uint8)

    def _reported_fps(self) -> float | None:
        with self._lock:
            fps = self._cap.get(cv2.CAP_PROP_FPS) if self._cap is not None else 0.0
        return fps if PLAUSIBLE_FPS[0] <= fps <= PLAUSIBLE_FPS[1] else None

    def _release(self) -> None:
        """Release the capture; the caller holds the lock."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None
