"""``edge-agent demo``: the synthetic line through the overlapped pipeline, with the
local drift check watching it.

Prints every fail / uncertain / error verdict, a summary line every second (rate,
counts, drops, latency, accuracy against the generator's ground truth) and, after each
drift-check window, what the device's own detectors say: the same windows and detectors
as a running agent (``edge_agent.core.stats``, ``edge_agent.core.drift``), without a
broker. At ``--brightness 0.8`` the brightness CUSUM fires within the first windows.
"""

from __future__ import annotations

import math
import signal
import time
from collections import deque
from types import FrameType
from typing import TextIO

from edge_agent.core.drift import DriftMonitor, DriftStatus
from edge_agent.core.features import image_features
from edge_agent.core.stats import WindowAccumulator, edges_of
from edge_agent.core.synthetic import LineConditions
from edge_agent.inspect import Inspector
from edge_agent.pipeline import Inspection, Pipeline
from edge_agent.sources.synthetic import SyntheticLine
from edge_agent.summary import p50_p99


def run_demo(
    inspector: Inspector,
    conditions: LineConditions,
    *,
    seed: int,
    size: tuple[int, int],
    fps: float,
    seconds: float,
    check_frames: int,
    out: TextIO,
) -> int:
    """Run the demo until ``seconds`` pass (0: until Ctrl-C); closes ``inspector``.

    Raises:
        ValueError: ``check_frames`` below 50.
    """
    line = SyntheticLine(seed=seed, size=size, conditions=conditions, fps=fps, encode_jpeg=True)
    pipeline = Pipeline(inspector, drop_oldest=True)
    watch = _DriftWatch(inspector, check_frames, out)

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        line.stop_event.set()
        pipeline.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    m = inspector.manifest
    out.write(
        f"edge-agent demo: {m.id} on {inspector.runtime.name}/{inspector.runtime.provider}, "
        f"synthetic line {size[0]}x{size[1]} at {fps:g} fps, "
        f"brightness {conditions.brightness:g}, defect rate {conditions.defect_rate:g}, "
        f"variant {conditions.variant}; drift check every {check_frames} frames\n"
    )
    summary = _Summary(out)
    deadline = time.monotonic() + seconds if seconds > 0 else math.inf
    try:
        for inspection in pipeline.run(line):
            v = inspection.verdict
            truth = line.labels.get(v.frame_id, "?")
            summary.add(v.outcome.value, v.latency_ms, truth, v.label)
            if v.outcome.value in ("fail", "uncertain", "error"):
                detail = v.error or f"p_defect={v.p_defect:.3f}"
                out.write(
                    f"frame {v.frame_id:6d}  {v.outcome.value:9s} {detail}  (truth: {truth})\n"
                )
            watch.add(inspection, pipeline.counters.dropped)
            summary.maybe_print(pipeline.counters.dropped)
            if time.monotonic() >= deadline:
                on_signal(0, None)
        summary.maybe_print(pipeline.counters.dropped, force=True)
    finally:
        inspector.close()
    return 0


class _DriftWatch:
    """Windows of ``check_frames`` frames into the bundle's drift monitor; one line each."""

    def __init__(self, inspector: Inspector, check_frames: int, out: TextIO) -> None:
        reference = inspector.manifest.reference
        self.out = out
        self.monitor = None if reference is None else DriftMonitor(reference, inspector.decision)
        self.acc = WindowAccumulator(
            edges_of(reference), max_frames=check_frames, max_seconds=math.inf
        )
        self.model = inspector.manifest.id
        self.seq = 0
        self.dropped = 0
        if self.monitor is None:
            out.write(f"drift check off: bundle {self.model} has no reference profile\n")

    def add(self, item: Inspection, dropped_total: int) -> None:
        if self.monitor is None:
            return
        if dropped_total > self.dropped:
            self.acc.add_dropped(dropped_total - self.dropped)
            self.dropped = dropped_total
        v = item.verdict
        features = None
        if v.error is None and item.fitted is not None:
            features = image_features(item.fitted)
        now = time.time()
        self.acc.add(v.outcome.value, features, v.p_defect, v.latency_ms, now)
        if not self.acc.due(now):
            return
        window = self.acc.close(now, seq=self.seq, model=self.model, edge="demo")
        if window is not None:
            self.seq += 1
            self.out.write(describe_status(self.monitor.update(window), window.frames) + "\n")


def describe_status(status: DriftStatus, frames: int) -> str:
    """One line for a drift-check window: in control, or each alarm with its evidence."""
    head = f"drift check, window {status.seq} ({frames} frames):"
    if status.skipped is not None:
        return f"{head} skipped ({status.skipped})"
    if not status.alarms:
        return f"{head} in control"
    parts = []
    for f in status.alarms:
        unit = " sd" if f.test == "cusum" else ""
        effect = "" if f.effect is None else f", effect {f.effect:+.2f}{unit}"
        direction = "" if f.direction is None else f" {f.direction}"
        parts.append(f"{f.feature}{direction} ({f.test}{effect}, since window {f.since_seq})")
    return f"{head} DRIFT " + "; ".join(parts)


class _Summary:
    """Running counts and latency percentiles, printed at most once a second."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.monotonic()
        self.last = self.started
        self.counts: dict[str, int] = {"pass": 0, "fail": 0, "uncertain": 0, "error": 0}
        self.latencies: deque[float] = deque(maxlen=2000)
        self.correct = 0
        self.judged = 0

    def add(self, outcome: str, latency_ms: float, truth: str, label: str) -> None:
        self.counts[outcome] += 1
        self.latencies.append(latency_ms)
        if outcome != "error" and truth in ("ok", "defect"):
            self.judged += 1
            self.correct += int(label == truth)

    def maybe_print(self, dropped: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 1.0:
            return
        self.last = now
        n = sum(self.counts.values())
        p50, p99 = p50_p99(self.latencies)
        acc = self.correct / self.judged if self.judged else math.nan
        c = self.counts
        self.out.write(
            f"[{now - self.started:6.1f}s] {n} frames, {n / max(now - self.started, 1e-9):.1f}/s"
            f" | pass {c['pass']} fail {c['fail']} uncertain {c['uncertain']} error {c['error']}"
            f" dropped {dropped} | latency p50 {_ms(p50)} p99 {_ms(p99)}"
            f" | accuracy vs truth {acc:.3f}\n"
        )
        self.out.flush()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"
