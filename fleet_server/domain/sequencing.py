"""Per-device sequence order for the detectors: windows in, windows in seq order out.

Sequential detectors (CUSUM) need each device's windows in seq order, once each. A
device's spool normally delivers in order; a gap (a window still on its way, or dropped
from a full spool for good) is waited for up to ``wait_s``, then skipped. A window at or
below the last one released is late: it is stored, but never fed (``offer`` says so).

Pure: time comes in as ``now`` (monotonic seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class _Pending(Generic[T]):
    deadline: float
    items: dict[int, T] = field(default_factory=dict)


class SeqOrderer(Generic[T]):
    """Releases each device's items in increasing seq, waiting ``wait_s`` for gaps.

    Raises:
        ValueError: a negative ``wait_s``.
    """

    def __init__(self, wait_s: float) -> None:
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self._wait_s = wait_s
        self._released: dict[str, int] = {}
        self._pending: dict[str, _Pending[T]] = {}

    def prime(self, device: str, seq: int) -> None:
        """Mark ``seq`` as the last released of ``device`` (after replaying storage)."""
        self._released[device] = max(seq, self._released.get(device, seq))

    def last(self, device: str) -> int | None:
        """The last seq released for ``device``."""
        return self._released.get(device)

    def offer(self, device: str, seq: int, item: T, now: float) -> list[T] | None:
        """Items now ready for ``device`` in seq order (maybe none yet: a gap is waited
        for); None if ``seq`` is late (at or below the last released)."""
        last = self._released.get(device)
        if last is not None and seq <= last:
            return None
        pending = self._pending.get(device)
        if last is None or seq == last + 1:
            ready = [item]
            self._released[device] = seq
            if pending is not None:
                pending.items.pop(seq, None)
                ready += self._drain(device, pending)
            return ready
        if pending is None:
            pending = self._pending[device] = _Pending(now + self._wait_s)
        pending.items[seq] = item
        return []

    def due(self, now: float) -> list[tuple[str, T]]:
        """Items of devices whose gap has been waited for long enough, in seq order
        (the missing seqs are given up)."""
        out: list[tuple[str, T]] = []
        for device in sorted(self._pending):
            pending = self._pending[device]
            if now < pending.deadline:
                continue
            del self._pending[device]
            for seq in sorted(pending.items):
                self._released[device] = seq
                out.append((device, pending.items[seq]))
        return out

    def waiting(self) -> int:
        """Items held back behind gaps."""
        return sum(len(p.items) for p in self._pending.values())

    def _drain(self, device: str, pending: _Pending[T]) -> list[T]:
        ready: list[T] = []
        nxt = self._released[device] + 1
        while nxt in pending.items:
            ready.append(pending.items.pop(nxt))
            self._released[device] = nxt
            nxt += 1
        if not pending.items:
            del self._pending[device]
        return ready
