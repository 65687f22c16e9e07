"""Frames as they come from a source: an id, a capture time and the image.

A frame carries either encoded bytes (a JPEG from a camera or a file; decoded later in
the pipeline's decode stage, off the source's thread) or an already decoded BGR image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Frame:
    frame_id: int
    timestamp: float
    source: str
    data: bytes | None = None
    image: npt.NDArray[np.uint8] | None = None
    # Stable identity of the input when it has one (a hot-folder file: name, size,
    # mtime), recorded with the verdict so a file is never inspected twice.
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.image is None):
            raise ValueError("a frame has exactly one of data (encoded) or image (decoded)")
