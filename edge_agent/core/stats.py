"""The stats window: per-frame features and verdicts in, one aggregate window out.

    acc = WindowAccumulator(edges_of(profile))
    for each inspected frame: acc.add(outcome, features, p_defect, latency_ms)
    if acc.due(now): window = acc.close(now, seq=..., model=..., edge=...)

Per-frame values are kept in memory only until the window closes; what leaves is built by
``close`` and checked by ``edge_agent.protocol.telemetry.check_privacy``. A window with
fewer than MIN_WINDOW_FRAMES frames is not closed: its frames carry over into the next
one. A histogram that would hold fewer than MIN_FRAMES_PER_BIN frames per bin is left
out of the window (its moments still go). Pure: time comes in as an argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from edge_agent.core.features import default_edges, histogram
from edge_agent.protocol.manifest import FEATURE_NAMES, ReferenceProfile
from edge_agent.protocol.telemetry import (
    LATENCY_EDGES_MS,
    MIN_FRAMES_PER_BIN,
    MIN_WINDOW_FRAMES,
    P_DEFECT,
    Moments,
    TelemetryWindow,
    bin_floor,
    edges_id,
)

DEFAULT_WINDOW_FRAMES = 500
DEFAULT_WINDOW_SECONDS = 60.0
_IMAGE = len(FEATURE_NAMES) - 1  # columns 0..6 image features, column 7 p_defect
_OUTCOMES = ("pass", "fail", "uncertain", "error")


def edges_of(profile: ReferenceProfile | None) -> dict[str, list[float]]:
    """Histogram edges per feature: the reference profile's, or the fixed defaults."""
    if profile is None:
        return {name: default_edges(name) for name in FEATURE_NAMES}
    return {name: list(profile.features[name].edges) for name in FEATURE_NAMES}


class WindowAccumulator:
    """Collects one window. Not thread-safe: one caller (the agent's result loop).

    Args:
        edges: histogram edges per feature (all of FEATURE_NAMES), from ``edges_of``.
        max_frames, max_seconds: a window closes after this many frames or seconds,
            whichever comes first (``due``).
    """

    def __init__(
        self,
        edges: Mapping[str, Sequence[float]],
        *,
        max_frames: int = DEFAULT_WINDOW_FRAMES,
        max_seconds: float = DEFAULT_WINDOW_SECONDS,
    ) -> None:
        missing = [f for f in FEATURE_NAMES if f not in edges]
        if missing:
            raise ValueError(f"edges lack features: {', '.join(missing)}")
        if max_frames < MIN_WINDOW_FRAMES:
            raise ValueError(f"max_frames must be >= {MIN_WINDOW_FRAMES}, got {max_frames}")
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
        self.edges = {f: [float(v) for v in edges[f]] for f in FEATURE_NAMES}
        self.ref = edges_id(self.edges)
        self.max_frames = max_frames
        self.max_seconds = max_seconds
        self._rows = np.empty((max_frames, len(FEATURE_NAMES)), dtype=np.float64)
        self._latency = np.empty(max_frames, dtype=np.float64)
        self._reset()

    def _reset(self) -> None:
        # The window's clock starts with its first frame, so an idle line sends nothing.
        self._n_rows = 0
        self._counts = dict.fromkeys((*_OUTCOMES, "dropped"), 0)
        self._t0: float | None = None
        self._timer: float | None = None

    @property
    def frames(self) -> int:
        """Inspected frames (any outcome) collected so far."""
        return sum(self._counts[k] for k in _OUTCOMES)

    def add(
        self,
        outcome: str,
        features: npt.NDArray[np.float64] | None,
        p_defect: float,
        latency_ms: float,
        now: float,
    ) -> None:
        """Count one inspected frame. ``features`` are the seven image features (None for
        an error frame, which is only counted)."""
        if self._t0 is None:
            self._t0 = self._timer = now
        self._counts[outcome] += 1
        if features is None:
            return
        if self._n_rows == self._rows.shape[0]:
            # A window that could not close (under the frame floor at its deadline) or a
            # burst past max_frames before the caller closed it: grow, never drop.
            self._rows = np.concatenate([self._rows, np.empty_like(self._rows)])
            self._latency = np.concatenate([self._latency, np.empty_like(self._latency)])
        row = self._rows[self._n_rows]
        row[:_IMAGE] = features
        row[_IMAGE] = p_defect
        self._latency[self._n_rows] = latency_ms
        self._n_rows += 1

    def add_dropped(self, n: int) -> None:
        """Count frames the pipeline dropped (a live source the device fell behind on)."""
        self._counts["dropped"] += n

    def due(self, now: float) -> bool:
        if self.frames >= self.max_frames:
            return True
        return self._timer is not None and now - self._timer >= self.max_seconds

    def close(self, now: float, *, seq: int, model: str, edge: str) -> TelemetryWindow | None:
        """The window so far, and start a new one; None (frames kept) below the floor."""
        if self.frames < MIN_WINDOW_FRAMES:
            # Too few frames to send: they are merged into the next window.
            if self._timer is not None:
                self._timer = now
            return None
        assert self._t0 is not None
        rows = self._rows[: self._n_rows]
        moments: dict[str, Moments] = {}
        hist: dict[str, list[int]] = {}
        p_sum: list[float | None] | None = None
        if self._n_rows >= MIN_WINDOW_FRAMES:
            for j, name in enumerate(FEATURE_NAMES):
                col = rows[:, j]
                moments[name] = Moments(self._n_rows, float(col.sum()), float(col @ col))
                counts = histogram(col, self.edges[name])
                if sum(counts) >= bin_floor(counts):
                    hist[name] = counts
            if P_DEFECT in hist:
                p_sum = _sums_per_bin(rows[:, _IMAGE], self.edges[P_DEFECT], hist[P_DEFECT])
        latency_counts = histogram(self._latency[: self._n_rows], list(LATENCY_EDGES_MS))
        latency = latency_counts if sum(latency_counts) >= bin_floor(latency_counts) else None
        window = TelemetryWindow(
            seq=seq,
            t0=int(self._t0),
            t1=int(now),
            model=model,
            edge=edge,
            ref=self.ref,
            counts=dict(self._counts),
            moments=moments,
            hist=hist,
            p_sum=p_sum,
            latency=latency,
        )
        self._reset()
        return window


def _sums_per_bin(
    p: npt.NDArray[np.float64], edges: Sequence[float], counts: Sequence[int]
) -> list[float | None]:
    idx = np.searchsorted(np.asarray(edges), p, side="right")
    sums = np.bincount(idx, weights=p, minlength=len(edges) + 1)
    return [
        float(s) if c >= MIN_FRAMES_PER_BIN else None for s, c in zip(sums, counts, strict=True)
    ]
