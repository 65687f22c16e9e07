"""Evidence writing on its own thread, so disk latency never holds up the line.

Saving an image costs milliseconds (JPEG encoding, two fsyncs); on an SD card much
more. The service hands frames to ``EvidenceWriter.submit`` and moves on; a bounded
queue absorbs bursts, and when it is full the frame's evidence is dropped and counted
rather than slowing inspection.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

from edge_agent.core.decode import ImageError, decode_image
from edge_agent.core.frame import Frame
from edge_agent.sinks.evidence import EvidenceStore, evidence_path

log = logging.getLogger("edge_agent.evidence")

_JPEG_MAGIC = b"\xff\xd8"


@dataclass(slots=True)
class EvidenceCounters:
    submitted: int = 0
    written: int = 0
    dropped: int = 0


class EvidenceWriter:
    """Feeds an EvidenceStore from a background thread. ``submit`` never blocks."""

    def __init__(self, store: EvidenceStore, queue_size: int = 32) -> None:
        self.store = store
        self.counters = EvidenceCounters()
        self._queue: queue.Queue[tuple[Frame, str] | None] = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._loop, name="evidence", daemon=True)
        self._thread.start()

    def submit(self, frame: Frame, outcome: str) -> str | None:
        """Queue ``frame``'s image if the store wants it. Returns the path it will have
        (relative to the store's root), or None when it is not wanted or was dropped."""
        if not self.store.wants(outcome, frame.frame_id) or self.store.disabled_reason:
            return None
        try:
            self._queue.put_nowait((frame, outcome))
        except queue.Full:
            self.counters.dropped += 1
            return None
        self.counters.submitted += 1
        return evidence_path(outcome, frame.timestamp, frame.frame_id)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (waiting at most ``timeout`` seconds), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("evidence queue did not drain", extra={"event": "evidence_undrained"})
            return
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            frame, outcome = item
            if self._save(frame, outcome) is not None:
                self.counters.written += 1

    def _save(self, frame: Frame, outcome: str) -> str | None:
        data = frame.data
        if data is not None and data[:2] == _JPEG_MAGIC:
            # Camera and hot-folder JPEGs are kept as they came: no re-encoding.
            return self.store.save(frame.frame_id, frame.timestamp, outcome, jpeg=data)
        image = frame.image
        if image is None and data is not None:
            try:
                image = decode_image(data)
            except ImageError:
                return None  # an undecodable frame has no picture to keep
        if image is None:
            return None
        return self.store.save(frame.frame_id, frame.timestamp, outcome, image_bgr=image)
