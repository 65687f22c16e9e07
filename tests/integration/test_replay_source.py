"""ReplaySource on real files: directory order, loop, pacing, video, bad paths, close."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.core.frame import Frame
from edge_agent.sources.replay import ReplaySource

VIDEO_FRAMES = 12
VIDEO_FPS = 25.0
VIDEO_SIZE = (64, 48)  # width, height


def _image(seed: int, ext: str = ".jpg") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, pixels)
    assert ok
    return buf.tobytes()


def _image_dir(path: Path, count: int) -> dict[str, bytes]:
    path.mkdir()
    files = {f"{i:03d}.jpg": _image(i) for i in range(count)}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


@pytest.fixture
def video(tmp_path: Path) -> Path:
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), VIDEO_FPS, VIDEO_SIZE)
    assert writer.isOpened()
    width, height = VIDEO_SIZE
    for i in range(VIDEO_FRAMES):
        writer.write(np.full((height, width, 3), i * 20, np.uint8))
    writer.release()
    return path


def test_directory_yields_image_bytes_in_name_order(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    data = {"b.png": _image(1, ".png"), "a.jpg": _image(2), "c.bmp": _image(3, ".bmp")}
    for name, content in data.items():
        (images / name).write_bytes(content)
    (images / "notes.txt").write_text("not an image")
    (images / ".hidden.jpg").write_bytes(_image(4))
    (images / "sub").mkdir()
    (images / "sub" / "0.jpg").write_bytes(_image(5))

    frames = list(ReplaySource(images))

    assert [f.source for f in frames] == ["a.jpg", "b.png", "c.bmp"]
    assert [f.frame_id for f in frames] == [0, 1, 2]
    assert all(f.data == data[f.source] and f.image is None for f in frames)


def test_loop_restarts_with_increasing_ids(tmp_path: Path) -> None:
    _image_dir(tmp_path / "images", 3)
    src = ReplaySource(tmp_path / "images", loop=True)
    frames = list(itertools.islice(src, 7))
    src.close()
    assert [f.frame_id for f in frames] == list(range(7))
    assert [f.source for f in frames] == ["000.jpg", "001.jpg", "002.jpg"] * 2 + ["000.jpg"]


@pytest.mark.parametrize("realtime", [True, False])
def test_realtime_paces_frames_at_fps(tmp_path: Path, realtime: bool) -> None:
    _image_dir(tmp_path / "images", 10)
    src = ReplaySource(tmp_path / "images", fps=20.0, realtime=realtime)
    start = time.monotonic()
    assert len(list(src)) == 10
    elapsed = time.monotonic() - start
    if realtime:
        assert 0.4 <= elapsed <= 1.5  # 9 intervals of 50 ms
    else:
        assert elapsed < 0.4


def test_video_yields_decoded_frames_at_its_own_rate(video: Path) -> None:
    src = ReplaySource(video, realtime=True)
    assert src.fps == pytest.approx(VIDEO_FPS)
    start = time.monotonic()
    frames = list(src)
    elapsed = time.monotonic() - start
    width, height = VIDEO_SIZE
    assert len(frames) == VIDEO_FRAMES
    assert [f.frame_id for f in frames] == list(range(VIDEO_FRAMES))
    for i, frame in enumerate(frames):
        assert frame.data is None and frame.image is not None
        assert frame.image.shape == (height, width, 3) and frame.image.dtype == np.uint8
        assert frame.source == f"line.avi#{i}"
    assert 0.3 <= elapsed <= 1.5  # 11 intervals of 40 ms


def test_video_loop_keeps_counting(video: Path) -> None:
    src = ReplaySource(video, loop=True)
    frames = list(itertools.islice(src, VIDEO_FRAMES + 3))
    src.close()
    assert [f.frame_id for f in frames] == list(range(VIDEO_FRAMES + 3))
    assert frames[VIDEO_FRAMES].source == "line.avi#0"


def _missing(tmp: Path) -> Path:
    return tmp / "nope"


def _empty_dir(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    (tmp / "empty" / "readme.txt").write_text("no images here")
    return tmp / "empty"


def _not_a_video(tmp: Path) -> Path:
    (tmp / "clip.avi").write_text("this is not a video")
    return tmp / "clip.avi"


@pytest.mark.parametrize(
    ("make", "reason"),
    [(_missing, "does not exist"), (_empty_dir, "no images"), (_not_a_video, "cannot open")],
)
def test_bad_path_raises_at_construction_naming_it(
    tmp_path: Path, make: Callable[[Path], Path], reason: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(ValueError, match=reason) as info:
        ReplaySource(path)
    assert str(path) in str(info.value)


def test_realtime_directory_needs_fps(tmp_path: Path) -> None:
    _image_dir(tmp_path / "images", 1)
    with pytest.raises(ValueError, match="fps"):
        ReplaySource(tmp_path / "images", realtime=True)
    with pytest.raises(ValueError, match="fps"):
        ReplaySource(tmp_path / "images", fps=0.0)


def test_corrupt_file_is_yielded_and_removed_file_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _image_dir(tmp_path / "images", 3)
    (tmp_path / "images" / "001.jpg").write_bytes(b"not really a jpeg")
    src = ReplaySource(tmp_path / "images")
    (tmp_path / "images" / "002.jpg").unlink()  # removed after the listing
    with caplog.at_level(logging.WARNING, logger="edge_agent.sources.replay"):
        frames = list(src)
    assert [(f.source, f.data) for f in frames] == [
        ("000.jpg", files["000.jpg"]),
        ("001.jpg", b"not really a jpeg"),
    ]
    assert len(caplog.records) == 1 and src.counters.errors == 1


def test_close_from_another_thread_stops_an_endless_replay(tmp_path: Path) -> None:
    _image_dir(tmp_path / "images", 2)
    src = ReplaySource(tmp_path / "images", fps=50.0, realtime=True, loop=True)
    got: list[Frame] = []
    consumer = threading.Thread(target=lambda: got.extend(src))
    consumer.start()
    time.sleep(0.2)
    src.close()
    consumer.join(timeout=1.0)
    assert not consumer.is_alive()
    assert got
