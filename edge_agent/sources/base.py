"""The protocol every frame source implements.

A source is iterated on the pipeline's feeder thread and yields ``Frame`` objects whose
``frame_id`` increases. ``close`` may be called from any thread and makes iteration end
soon (within about a second), without raising.

After a frame's verdict has been stored durably (results.db committed), the service calls
``ack(frame, outcome)``. Sources that own their inputs act on it: the hot folder moves the
file to ``done/`` or ``error/``; other sources ignore it. Acknowledging only after the
commit is what makes a hot folder exactly-once across crashes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from edge_agent.core.frame import Frame


@dataclass(slots=True)
class SourceCounters:
    """What a source tells about itself: frames produced and lost, reconnects."""

    frames: int = 0
    lost: int = 0
    reconnects: int = 0
    errors: int = 0


class FrameSource(Protocol):
    @property
    def name(self) -> str:
        """Short description for logs, e.g. ``camera:rtsp://10.0.0.5/stream``."""
        ...

    @property
    def live(self) -> bool:
        """True when frames keep coming whether or not they are consumed (a camera):
        the pipeline then drops the oldest frame when it falls behind."""
        ...

    @property
    def counters(self) -> SourceCounters: ...

    def __iter__(self) -> Iterator[Frame]: ...

    def ack(self, frame: Frame, outcome: str) -> None:
        """The verdict of ``frame`` is stored; ``outcome`` is pass/fail/uncertain/error."""
        ...

    def close(self) -> None: ...
