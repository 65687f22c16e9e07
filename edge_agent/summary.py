"""The agent's periodic summary line, and the latency percentiles it and the demo print."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable

from edge_agent.pipeline import Inspection, Pipeline
from edge_agent.sinks.evidence_writer import EvidenceWriter
from edge_agent.sources.base import FrameSource

log = logging.getLogger("edge_agent.service")


def p50_p99(latencies: Iterable[float]) -> tuple[float | None, float | None]:
    """Median and 99th percentile (nearest rank); None, None for no values."""
    lat = sorted(latencies)
    if not lat:
        return None, None
    return lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]


class LineSummary:
    """Counts and latency percentiles, logged as one line every interval."""

    def __init__(self, interval_s: float) -> None:
        self.interval = interval_s
        self.started = self.last = time.monotonic()
        self.counts = {"pass": 0, "fail": 0, "uncertain": 0, "error": 0}
        self.total = 0
        self.window = 0
        self.latencies: deque[float] = deque(maxlen=4096)

    def add(self, item: Inspection) -> None:
        self.counts[item.verdict.outcome.value] += 1
        self.total += 1
        self.window += 1
        self.latencies.append(item.verdict.latency_ms)

    def due(self, now: float) -> bool:
        return now - self.last >= self.interval

    def log(self, now: float, pipeline: Pipeline, source: FrameSource, ev: EvidenceWriter) -> None:
        elapsed = max(now - self.last, 1e-9)
        p50, p99 = p50_p99(self.latencies)
        log.info(
            "summary",
            extra={
                "event": "summary",
                "frames": self.total,
                "fps": round(self.window / elapsed, 2),
                **self.counts,
                "dropped": pipeline.counters.dropped,
                "lost": source.counters.lost,
                "latency_p50_ms": None if p50 is None else round(p50, 2),
                "latency_p99_ms": None if p99 is None else round(p99, 2),
                "evidence_written": ev.counters.written,
                "evidence_dropped": ev.counters.dropped,
                "evidence_disabled": ev.store.disabled_reason is not None,
            },
        )
        self.last = now
        self.window = 0
