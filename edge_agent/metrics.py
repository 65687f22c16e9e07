"""What the agent tells a plant about itself: counters on the hot path, read on demand.

    inspection -> LineStats.add (a lock, a bisect: about a microsecond)
    scrape / GET /v1/status / OPC UA -> AgentView.snapshot() -> AgentSnapshot
                                     -> status_document() (JSON) | render_metrics() (Prometheus)

The hot path only counts verdicts by outcome and files the latency into fixed buckets.
Everything else (frames, drops, queue depths, output counters, update state, drift flags)
is read from the objects that already keep it, when someone asks. ``drift.json`` is read
at most once a second however often the API is polled.

Prometheus metrics (prefix ``edgefleet_agent_``) are listed in docs/line-outputs.md.
``prometheus_client`` is imported only by ``render_metrics`` and ``MetricsServer`` (the
``outputs`` extra), so an agent without REST API or metrics does not need it.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edge_agent.core.verdict import Outcome
from edge_agent.telemetry.alarm import DRIFT_FILE, read_drift_file

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from edge_agent.pipeline import Pipeline
    from edge_agent.sinks.outputs import OutputCounters
    from edge_agent.update.manager import UpdateManager

log = logging.getLogger("edge_agent.metrics")

OUTCOMES: tuple[str, ...] = tuple(o.value for o in Outcome)
# Upper bounds in ms; inference on a device takes 2-200 ms, a stalled runtime seconds.
LATENCY_BUCKETS_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
UPDATE_STATES: tuple[str, ...] = (
    "off",
    "idle",
    "checking",
    "downloading",
    "verified",
    "staged",
    "gate_started",
    "gate_passed",
    "gate_failed",
    "activated",
    "rolled_back",
    "refused",
    "failed",
)
DRIFT_READ_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Verdicts by outcome and a latency histogram (cumulative counts per upper bound)."""

    verdicts: dict[str, int]
    buckets_ms: tuple[float, ...]
    cumulative: tuple[int, ...]  # len(buckets_ms) + 1: the last is +Inf (= count)
    latency_sum_ms: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class LineStats:
    """Verdict counts and a latency histogram, updated from one thread, read from any.

    Args:
        buckets_ms: increasing upper bounds of the latency histogram, ms.

    Raises:
        ValueError: the buckets are empty or not increasing.
    """

    def __init__(self, buckets_ms: Sequence[float] = LATENCY_BUCKETS_MS) -> None:
        bounds = tuple(float(b) for b in buckets_ms)
        if not bounds or any(b >= c for b, c in itertools.pairwise(bounds)):
            raise ValueError(f"buckets_ms must be increasing and not empty, got {bounds}")
        self._bounds = bounds
        self._lock = threading.Lock()  # a snapshot must not see half an add
        self._verdicts = dict.fromkeys(OUTCOMES, 0)
        self._buckets = [0] * (len(bounds) + 1)
        self._sum_ms = 0.0

    def add(self, outcome: str, latency_ms: float) -> None:
        """Count one verdict (``outcome`` as in ``Outcome``) and its latency."""
        i = bisect.bisect_left(self._bounds, latency_ms)
        with self._lock:
            self._verdicts[outcome] = self._verdicts.get(outcome, 0) + 1
            self._buckets[i] += 1
            self._sum_ms += latency_ms

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            verdicts = dict(self._verdicts)
            buckets = list(self._buckets)
            total_ms = self._sum_ms
        cumulative, running = [], 0
        for n in buckets:
            running += n
            cumulative.append(running)
        return StatsSnapshot(verdicts, self._bounds, tuple(cumulative), total_ms)


@dataclass(frozen=True, slots=True)
class OutputSnapshot:
    name: str
    offered: int
    delivered: int
    dropped: int
    failed: int

    @property
    def depth(self) -> int:
        """Verdicts waiting (or in ``emit``): offered = delivered + dropped + failed + this."""
        return max(0, self.offered - self.delivered - self.dropped - self.failed)


@dataclass(frozen=True, slots=True)
class UpdateSnapshot:
    state: str  # one of UPDATE_STATES
    since: float | None  # Unix time of the last update event
    pending: str | None  # the target being gated, if any


@dataclass(frozen=True, slots=True)
class DriftSnapshot:
    drifting: bool
    features: tuple[str, ...]
    document: dict[str, object] | None  # drift.json as written; None before the first
    problem: str | None = None  # why drift.json could not be read


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    device_id: str
    model: str
    runtime: str
    provider: str
    uptime_s: float
    frames_in: int
    frames_dropped: int
    inspected: int
    in_flight: int  # frames taken from the source and not yet judged
    line: StatsSnapshot
    api: StatsSnapshot
    outputs: tuple[OutputSnapshot, ...]
    update: UpdateSnapshot
    drift: DriftSnapshot


class CountedOutput(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def counters(self) -> OutputCounters: ...


class DriftReader:
    """``state_dir/drift.json``, re-read at most every ``interval_s`` (on ``clock``)."""

    def __init__(
        self,
        state_dir: Path,
        interval_s: float = DRIFT_READ_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = state_dir / DRIFT_FILE
        self._interval_s, self._clock = interval_s, clock
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._last = DriftSnapshot(False, (), None)

    def read(self) -> DriftSnapshot:
        now = self._clock()
        with self._lock:
            if self._read_at is not None and now - self._read_at < self._interval_s:
                return self._last
            self._read_at = now
            self._last = _read_drift(self.path)
            return self._last


def _read_drift(path: Path) -> DriftSnapshot:
    try:
        document = read_drift_file(path)
    except (OSError, ValueError) as e:
        # A torn or unreadable file is reported, not raised: status must keep answering.
        return DriftSnapshot(False, (), None, str(e))
    if document is None:
        return DriftSnapshot(False, (), None)
    raw = document.get("features")
    features = tuple(str(f) for f in raw) if isinstance(raw, list) else ()
    return DriftSnapshot(bool(document.get("drifting")), features, document)


def update_snapshot(updates: UpdateManager | None) -> UpdateSnapshot:
    """The update path's state: its last reported event, or ``idle``/``off``."""
    if updates is None:
        return UpdateSnapshot("off", None, None)
    events = updates.events[-1:]  # a slice: the update thread may append meanwhile
    pending = updates.state.state.pending
    target = None if pending is None else pending.target
    if not events:
        return UpdateSnapshot("idle", None, target)
    return UpdateSnapshot(events[0].event.value, events[0].ts, target)


class AgentView:
    """Read-only handles on the running agent, for status, metrics and OPC UA.

    Built before the line starts (the outputs need ``stats``); ``attach`` adds the
    pipeline and the update manager once they exist. Until then the snapshot says
    ``model`` "" and zero frames.
    """

    def __init__(self, device_id: str, state_dir: Path, clock: Callable[[], float] = time.time):
        self.device_id = device_id
        self.state_dir = state_dir
        self.stats = LineStats()
        self.api_stats = LineStats()
        self.drift = DriftReader(state_dir)
        self.outputs: tuple[CountedOutput, ...] = ()
        self.pipeline: Pipeline | None = None
        self.updates: UpdateManager | None = None
        self._clock = clock
        self._started = clock()

    def attach(self, pipeline: Pipeline, updates: UpdateManager | None) -> None:
        self.pipeline, self.updates = pipeline, updates

    def snapshot(self) -> AgentSnapshot:
        pipeline = self.pipeline
        model = runtime = provider = ""
        frames_in = dropped = inspected = 0
        if pipeline is not None:
            inspector = pipeline.inspector
            model = inspector.manifest.id
            runtime, provider = inspector.runtime.name, inspector.runtime.provider
            c = pipeline.counters
            frames_in, dropped, inspected = c.frames_in, c.dropped, c.inspected
        return AgentSnapshot(
            device_id=self.device_id,
            model=model,
            runtime=runtime,
            provider=provider,
            uptime_s=max(0.0, self._clock() - self._started),
            frames_in=frames_in,
            frames_dropped=dropped,
            inspected=inspected,
            in_flight=max(0, frames_in - dropped - inspected),
            line=self.stats.snapshot(),
            api=self.api_stats.snapshot(),
            outputs=tuple(
                OutputSnapshot(
                    o.name,
                    o.counters.offered,
                    o.counters.delivered,
                    o.counters.dropped,
                    o.counters.failed,
                )
                for o in self.outputs
            ),
            update=update_snapshot(self.updates),
            drift=self.drift.read(),
        )


def status_document(snap: AgentSnapshot) -> dict[str, object]:
    """The JSON of ``GET /v1/status`` (pure)."""
    return {
        "device": snap.device_id,
        "model": snap.model,
        "runtime": snap.runtime,
        "provider": snap.provider,
        "uptime_s": round(snap.uptime_s, 3),
        "counters": {
            "frames": snap.frames_in,
            "dropped": snap.frames_dropped,
            "inspected": snap.inspected,
            "in_flight": snap.in_flight,
            "verdicts": snap.line.verdicts,
            "api_inspections": snap.api.verdicts,
        },
        "outputs": {
            o.name: {
                "offered": o.offered,
                "delivered": o.delivered,
                "dropped": o.dropped,
                "failed": o.failed,
                "queued": o.depth,
            }
            for o in snap.outputs
        },
        "drift": {
            "drifting": snap.drift.drifting,
            "features": list(snap.drift.features),
            "detail": snap.drift.document,
            "problem": snap.drift.problem,
        },
        "update": {
            "state": snap.update.state,
            "since": snap.update.since,
            "pending": snap.update.pending,
        },
    }


def metric_families(snap: AgentSnapshot) -> Iterator[Metric]:
    """The Prometheus metric families of one snapshot (pure)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    p = "edgefleet_agent_"
    info = GaugeMetricFamily(p + "model_info", "The model in use", labels=["model", "runtime"])
    info.add_metric([snap.model, snap.runtime], 1)
    yield info
    yield GaugeMetricFamily(p + "uptime_seconds", "Seconds since the agent started", snap.uptime_s)
    yield CounterMetricFamily(p + "frames", "Frames taken from the source", snap.frames_in)
    yield CounterMetricFamily(
        p + "frames_dropped", "Frames a live source dropped (behind)", snap.frames_dropped
    )
    for name, stats, text in (
        ("verdicts", snap.line, "Verdicts of the line by outcome"),
        ("api_inspections", snap.api, "POST /v1/inspect verdicts by outcome"),
    ):
        family = CounterMetricFamily(p + name, text, labels=["outcome"])
        for outcome, n in stats.verdicts.items():
            family.add_metric([outcome], n)
        yield family
    latency = HistogramMetricFamily(
        p + "inference_latency_seconds", "Decode to end of inference, per line frame"
    )
    line = snap.line
    buckets = [
        (f"{b / 1000.0:g}", n) for b, n in zip(line.buckets_ms, line.cumulative, strict=False)
    ]
    buckets.append(("+Inf", line.count))
    latency.add_metric([], buckets, line.latency_sum_ms / 1000.0)
    yield latency
    depth = GaugeMetricFamily(p + "queue_depth", "Items waiting in a queue", labels=["queue"])
    depth.add_metric(["pipeline"], snap.in_flight)
    for o in snap.outputs:
        depth.add_metric([f"output:{o.name}"], o.depth)
    yield depth
    for field, text in (
        ("offered", "Verdicts offered to a line output"),
        ("delivered", "Verdicts a line output delivered"),
        ("dropped", "Verdicts a line output dropped (queue full, unavailable, closed)"),
        ("failed", "Verdicts a line output failed to deliver"),
    ):
        family = CounterMetricFamily(p + f"output_{field}", text, labels=["output"])
        for o in snap.outputs:
            family.add_metric([o.name], getattr(o, field))
        yield family
    update = GaugeMetricFamily(
        p + "update_state", "1 for the update path's state", labels=["state"]
    )
    for state in UPDATE_STATES:
        update.add_metric([state], 1 if state == snap.update.state else 0)
    yield update
    yield GaugeMetricFamily(
        p + "drifting", "1 while the local drift check flags a feature", int(snap.drift.drifting)
    )
    flags = GaugeMetricFamily(p + "drift_flag", "1 per flagged feature", labels=["feature"])
    for feature in snap.drift.features:
        flags.add_metric([feature], 1)
    yield flags


class _ViewCollector:
    def __init__(self, view: AgentView) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        return metric_families(self._view.snapshot())


def metrics_registry(view: AgentView) -> CollectorRegistry:
    """A registry holding only this agent's metrics (not the process-wide default)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ViewCollector(view))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry`` (from ``metrics_registry``)."""
    from prometheus_client import generate_latest

    return generate_latest(registry)


class MetricsServer:
    """``GET /metrics`` on its own address, for an agent without the REST API.

    Raises (from the constructor):
        OSError: the address cannot be bound (in use, not local).
    """

    def __init__(self, view: AgentView, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        registry = metrics_registry(view)
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
