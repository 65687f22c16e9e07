"""The synthetic line as a frame source, and writing synthetic image sets to disk."""

from __future__ import annotations

import csv
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from edge_agent.core.frame import Frame
from edge_agent.core.synthetic import LineConditions, render_item
from edge_agent.sources.base import SourceCounters

IMAGE_FORMATS = ("jpg", "png")


@dataclass
class SyntheticLine:
    """An endless (or ``count``-long) stream of synthetic products.

    ``fps`` paces frames in real time (0: as fast as they render). ``encode_jpeg`` hands
    out JPEG bytes as a camera or hot folder would, so the pipeline decodes them.
    ``labels`` records the true label of each frame id, for measuring accuracy.
    ``brightness_end`` with ``ramp_frames`` changes the lighting linearly from
    ``conditions.brightness`` at frame 0 to ``brightness_end`` at frame ``ramp_frames`` and
    holds it there: a lamp ageing or a shutter drifting, for drift scenarios.
    """

    seed: int = 0
    size: tuple[int, int] = (640, 480)
    conditions: LineConditions = field(default_factory=LineConditions)
    fps: float = 0.0
    count: int | None = None
    encode_jpeg: bool = False
    jpeg_quality: int = 90
    labels: dict[int, str] = field(default_factory=dict)
    brightness_end: float | None = None
    ramp_frames: int = 1
    stop_event: threading.Event = field(default_factory=threading.Event)
    counters: SourceCounters = field(default_factory=SourceCounters)

    @property
    def name(self) -> str:
        return f"synthetic:seed={self.seed}"

    @property
    def live(self) -> bool:
        """Paced in real time it behaves like a camera: frames do not wait."""
        return self.fps > 0

    def ack(self, frame: Frame, outcome: str) -> None:
        """Nothing to do: synthetic frames own no files."""

    def conditions_at(self, index: int) -> LineConditions:
        """The line's conditions at frame ``index`` (the brightness ramp applied)."""
        if self.brightness_end is None:
            return self.conditions
        start = self.conditions.brightness
        share = min(1.0, index / max(1, self.ramp_frames))
        return replace(self.conditions, brightness=start + (self.brightness_end - start) * share)

    def close(self) -> None:
        self.stop_event.set()

    def __iter__(self) -> Iterator[Frame]:
        period = 1.0 / self.fps if self.fps > 0 else 0.0
        next_due = time.monotonic()
        index = 0
        while (self.count is None or index < self.count) and not self.stop_event.is_set():
            item = render_item(self.seed, index, self.size, self.conditions_at(index))
            self.labels[index] = item.label
            if period:
                delay = next_due - time.monotonic()
                if delay > 0 and self.stop_event.wait(delay):
                    return
                next_due = max(next_due + period, time.monotonic() - period)
            source = self.name
            self.counters.frames += 1
            if self.encode_jpeg:
                ok, buf = cv2.imencode(
                    ".jpg", item.image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality]
                )
                if not ok:
                    raise RuntimeError("OpenCV failed to encode a synthetic frame")
                yield Frame(index, time.time(), source, data=buf.tobytes())
            else:
                yield Frame(index, time.time(), source, image=item.image)
            index += 1


def write_synthetic_set(
    out: Path,
    *,
    count: int,
    seed: int,
    size: tuple[int, int],
    conditions: LineConditions,
    image_format: str = "png",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``count`` images and ``labels.csv`` (columns ``file,label``) into ``out``.

    Images are named ``{seed}-{index:06d}.{format}``. Returns the path of labels.csv,
    which is written last (atomically), so a complete csv means a complete set.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    for index in range(count):
        item = render_item(seed, index, size, conditions)
        name = f"{seed}-{index:06d}.{image_format}"
        if not cv2.imwrite(str(out / name), item.image):
            raise OSError(f"cannot write {out / name}")
        rows.append((name, item.label))
        if progress is not None:
            progress(index + 1, count)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("file", "label"))
    writer.writerows(rows)
    labels = out / "labels.csv"
    tmp = labels.with_suffix(".csv.tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(labels)
    return labels


def jpeg_frames(
    seed: int, count: int, size: tuple[int, int], conditions: LineConditions, quality: int = 90
) -> list[bytes]:
    """Encode ``count`` synthetic products as JPEG bytes (for benchmarks and tests)."""
    frames = []
    for index in range(count):
        image = render_item(seed, index, size, conditions).image
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("OpenCV failed to encode a synthetic frame")
        frames.append(np.asarray(buf).tobytes())
    return frames
