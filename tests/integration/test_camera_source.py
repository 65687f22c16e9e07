"""CameraSource against a real stream: ffmpeg serves a test pattern over RTSP or HTTP."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import pytest

from edge_agent.core.frame import Frame
from edge_agent.sources.base import FrameSource
from edge_agent.sources.camera import (
    MAX_FAILED_READS,
    Backoff,
    CameraSource,
    LossEstimate,
    connection_lost,
    redact,
)
from tests.streaming import FfmpegStreamServer, free_port

SIZE = (320, 240)
FPS = 20
LOGGER = "edge_agent.sources.camera"


class Reader:
    """Iterates a source on its own thread, as the pipeline's feeder does."""

    def __init__(self, source: CameraSource) -> None:
        self.source = source
        self.frames: list[Frame] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for frame in self.source:
                self.frames.append(frame)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e

    def wait_for(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.frames) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.frames) >= count, f"{len(self.frames)} frames in {timeout_s} s"

    def close(self, within_s: float = 1.0) -> float:
        """Close the source from this thread; the iteration must end within ``within_s``."""
        started = time.monotonic()
        self.source.close()
        self._thread.join(timeout=within_s + 1)
        took = time.monotonic() - started
        assert not self._thread.is_alive(), "iteration did not end after close()"
        assert took <= within_s, f"iteration ended {took:.2f} s after close()"
        assert self.error is None, repr(self.error)
        return took


@pytest.fixture(params=["rtsp", "http"])
def server(request: pytest.FixtureRequest) -> Iterator[FfmpegStreamServer]:
    with FfmpegStreamServer(request.param, fps=FPS, size=SIZE) as running:
        yield running


def assert_increasing(frames: list[Frame]) -> None:
    ids = [frame.frame_id for frame in frames]
    assert ids == sorted(set(ids)), "frame ids must strictly increase"


def test_reads_frames_and_closes_promptly(server: FfmpegStreamServer) -> None:
    source = CameraSource(server.url, open_timeout_s=3, read_timeout_s=2)
    typed: FrameSource = source  # mypy checks the protocol
    assert typed.live
    reader = Reader(source)
    reader.wait_for(20, timeout_s=10)
    reader.close()
    frames = reader.frames
    assert_increasing(frames)
    assert frames[0].frame_id == 0
    for frame in frames:
        assert frame.image is not None
        assert frame.image.shape == (SIZE[1], SIZE[0], 3)
        assert frame.image.dtype == np.uint8
        assert frame.source == f"camera:{server.url}"
    last = frames[-1].image
    assert last is not None and float(last.std()) > 10, "a test pattern, not a blank frame"
    assert source.counters.frames == len(frames)
    assert source.counters.reconnects == 0


def test_server_dies_and_comes_back(
    server: FfmpegStreamServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    source = CameraSource(
        server.url,
        fps=FPS,
        open_timeout_s=2,
        read_timeout_s=1,
        backoff_initial_s=0.2,
        backoff_max_s=0.8,
    )
    reader = Reader(source)
    reader.wait_for(10, timeout_s=10)
    server.stop()
    wait_until(lambda: "lost" in caplog.text, timeout_s=3)
    before = len(reader.frames)
    time.sleep(1.5)
    server.start()
    reader.wait_for(before + 10, timeout_s=10)
    reader.close()
    assert_increasing(reader.frames)
    assert source.counters.reconnects >= 1
    # 1.5 s dark at 20 fps is about 30 frames; reconnecting adds to the gap.
    assert 20 <= source.counters.lost <= 200, source.counters
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].getMessage().startswith(f"camera {server.url} lost: ")
    assert "reconnecting in 0.2 s" in warnings[0].getMessage()
    assert any("reconnected after" in r.getMessage() for r in caplog.records)


def test_dead_server_stalls_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    """A server that keeps the connection open but sends nothing: the read timeout fires."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with FfmpegStreamServer("rtsp", fps=FPS, size=SIZE) as server:
        source = CameraSource(server.url, fps=FPS, read_timeout_s=1, backoff_initial_s=0.2)
        reader = Reader(source)
        reader.wait_for(10, timeout_s=10)
        server.freeze()
        wait_until(lambda: "lost" in caplog.text, timeout_s=3)
        server.thaw()
        reader.wait_for(len(reader.frames) + 10, timeout_s=10)
        reader.close()
    # The first read after the freeze blocks for read_timeout_s, then returns False.
    assert re.search(r"lost: 1 failed read\(s\) in 1\.[0-4] s", caplog.text), caplog.text
    assert source.counters.reconnects >= 1
    assert_increasing(reader.frames)


@pytest.mark.parametrize("kind", ["closed-port", "silent-server", "missing-device"])
def test_target_that_never_opens(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes handshakes; nobody ever answers
        targets = {
            "closed-port": f"rtsp://127.0.0.1:{free_port()}/live",
            "silent-server": f"rtsp://127.0.0.1:{silent.getsockname()[1]}/live",
            "missing-device": "/dev/video99",
        }
        source = CameraSource(
            targets[kind], open_timeout_s=0.5, backoff_initial_s=0.1, backoff_max_s=0.4
        )
        reader = Reader(source)
        time.sleep(1.5)
        reader.close()
    assert reader.frames == []
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) >= 2, messages
    assert [r.levelno for r in caplog.records].count(logging.WARNING) == 1
    assert messages[0].endswith("lost: cannot open; reconnecting in 0.1 s")
    assert "still unavailable (attempt 2)" in messages[1]
    assert source.counters.frames == 0
    assert source.counters.reconnects == 0


def test_close_before_iterating_and_twice() -> None:
    source = CameraSource(f"rtsp://127.0.0.1:{free_port()}/live")
    source.close()
    source.close()
    assert list(source) == []


def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# Pure decision logic -------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(initial_s=0.5, max_s=30)
    assert [backoff.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_connection_lost_after_repeated_or_slow_failures() -> None:
    assert not connection_lost(0, dark_s=99, read_timeout_s=5)
    assert not connection_lost(MAX_FAILED_READS - 1, dark_s=0.1, read_timeout_s=5)
    assert connection_lost(MAX_FAILED_READS, dark_s=0.1, read_timeout_s=5)
    assert connection_lost(1, dark_s=5.0, read_timeout_s=5)


def test_loss_without_fps_counts_failed_reads() -> None:
    loss = LossEstimate(last_frame=0.0)
    assert loss.delivered(0.1) == 0
    assert [loss.failed_read(t) for t in (0.2, 0.3, 10.0)] == [1, 1, 1]
    assert loss.failed_open(20.0) == 0
    assert loss.delivered(30.0) == 0


def test_loss_with_fps_counts_the_dark_time() -> None:
    loss = LossEstimate(last_frame=0.0, fps=10)
    assert loss.delivered(0.1) == 0
    assert loss.delivered(0.3) == 0, "a late frame is jitter, not loss"
    assert loss.failed_read(0.4) == 1  # the frame due at 0.4 did not come
    assert loss.failed_open(1.0) == 6  # 0.7 s dark
    assert loss.delivered(2.3) == 12  # 2.0 s dark: 20 frames missed before this one
    assert loss.failed_read(2.31) == 1, "a new outage always counts its failed read"
    assert loss.delivered(2.4) == 0


@pytest.mark.parametrize(
    ("target", "shown"),
    [
        ("rtsp://admin:secret@10.0.0.5:554/s1", "rtsp://admin:***@10.0.0.5:554/s1"),
        ("rtsp://10.0.0.5/s1", "rtsp://10.0.0.5/s1"),
        ("/dev/video0", "/dev/video0"),
    ],
)
def test_name_hides_passwords(target: str, shown: str) -> None:
    assert redact(target) == shown
    assert CameraSource(target).name == f"camera:{shown}"


def test_bad_arguments_raise() -> None:
    pipeline = "videotestsrc ! videoconvert ! appsink"
    if cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        assert CameraSource(pipeline).name == f"camera:{pipeline}"
    else:
        with pytest.raises(ValueError, match="GStreamer"):
            CameraSource(pipeline)
    with pytest.raises(ValueError, match="fourcc"):
        CameraSource("/dev/video0", fourcc="MJPEG")
