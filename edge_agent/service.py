"""The one place that builds the agent's I/O objects from config and runs the line.

    source -> pipeline (decode, preprocess, inference) -> results.db, evidence -> ack
                                                       -> telemetry windows, drift alarm

With ``[fleet] broker`` set the agent holds ONE MQTT connection, shared by model updates
(with ``root_metadata``), telemetry and the retained device state; its last will marks
the device offline.

``build_plan`` resolves config and firmware profile into plain values (what ``edge-agent
check`` prints); ``Agent`` opens everything and runs until the source ends or SIGTERM.
Results are committed to results.db in small batches; a source is told a frame is done
(``ack``) only after its row is committed, so a crash never loses or repeats a file.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import numpy as np

from edge_agent.config import AgentConfig, ConfigError, FirmwareProfile
from edge_agent.core.synthetic import LineConditions
from edge_agent.inspect import Inspector
from edge_agent.line_outputs import open_outputs
from edge_agent.pipeline import Inspection, Pipeline
from edge_agent.protocol.manifest import Decision
from edge_agent.runtimes import RuntimeOptions
from edge_agent.sinks.evidence import EvidenceStore
from edge_agent.sinks.evidence_writer import EvidenceWriter
from edge_agent.sinks.result_store import GuardedResults
from edge_agent.sinks.results_db import ResultRecord, ResultsDB, ResultsDBError
from edge_agent.sources.base import FrameSource
from edge_agent.summary import LineSummary
from edge_agent.systemd import ServiceNotifier
from edge_agent.telemetry.device import DeviceTelemetry, TelemetrySettings
from edge_agent.telemetry.presence import will_of
from edge_agent.telemetry.spool import SpoolError
from edge_agent.transport import MqttTransport, TlsFiles
from edge_agent.update.device import FleetLink, open_active_model, open_slots, start_updates
from edge_agent.update.gate import GateLimits
from edge_agent.update.manager import UpdateManager, UpdateSettings
from edge_agent.update.slots import SlotStore
from edge_agent.update.trust import DeviceFacts

log = logging.getLogger("edge_agent.service")

RETENTION_INTERVAL_S = 60.0
# Shares of the evidence quota per outcome: failures are what an engineer reviews, so
# they are kept longest; a sample of passes documents what "good" looked like.
EVIDENCE_SHARES = {"fail": 0.6, "uncertain": 0.3, "pass": 0.1, "error": 0.0}


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the agent would run with, resolved from config and profile."""

    device_id: str
    profile: str
    source: str
    bundle: Path
    runtime_options: RuntimeOptions
    decode_workers: int
    queue_size: int
    t_fail: float | None
    t_uncertain: float | None
    state_dir: Path
    results_db: Path
    evidence_dir: Path
    evidence_quota: dict[str, int]
    camera: tuple[int, int, float, str]
    runtimes: tuple[str, ...] = ("onnx", "tflite")
    memory_budget_mb: float = 1024.0
    latency_budget_ms: float = 100.0


def build_plan(cfg: AgentConfig, profile: FirmwareProfile) -> Plan:
    rt = cfg.runtime
    cam = profile.camera
    src = cfg.source
    quota_mb = cfg.storage.evidence_quota_mb
    total = (profile.evidence.quota_mb if quota_mb is None else quota_mb) * 1024 * 1024
    return Plan(
        device_id=cfg.device.id,
        profile=profile.name,
        source=src.url,
        bundle=cfg.model.bundle,
        runtime_options=RuntimeOptions(
            threads=rt.threads or profile.threads,
            providers=tuple(rt.providers or profile.providers),
        ),
        decode_workers=rt.decode_workers or profile.decode_workers,
        queue_size=rt.queue_size,
        t_fail=cfg.thresholds.t_fail,
        t_uncertain=cfg.thresholds.t_uncertain,
        state_dir=cfg.storage.state_dir,
        results_db=cfg.storage.results_db,
        evidence_dir=cfg.storage.evidence_dir,
        evidence_quota={k: int(total * share) for k, share in EVIDENCE_SHARES.items()},
        camera=(
            src.width or cam.width,
            src.height or cam.height,
            src.fps or cam.fps,
            src.fourcc or cam.fourcc,
        ),
        runtimes=tuple(profile.runtimes),
        memory_budget_mb=float(profile.memory_budget_mb),
        latency_budget_ms=profile.latency_budget_ms,
    )


def open_inspector(plan: Plan, bundle: Path | None = None) -> Inspector:
    """Open the bundle's model (``bundle``, default the plan's) and apply the device's
    threshold overrides.

    Raises:
        BundleError, ModelLoadError: the bundle or model is unusable (named).
        ConfigError: overridden thresholds contradict each other or the bundle's.
    """
    inspector = Inspector.open(plan.bundle if bundle is None else bundle, plan.runtime_options)
    if plan.t_fail is not None or plan.t_uncertain is not None:
        own = inspector.manifest.decision
        t_fail = own.t_fail if plan.t_fail is None else plan.t_fail
        t_uncertain = own.t_uncertain if plan.t_uncertain is None else plan.t_uncertain
        if t_uncertain > t_fail:
            inspector.close()
            raise ConfigError(
                f"[thresholds] t_uncertain {t_uncertain} is above t_fail {t_fail} "
                f"(bundle {inspector.manifest.id} has {own.t_uncertain} / {own.t_fail})"
            )
        inspector.decision = Decision(t_fail=t_fail, t_uncertain=t_uncertain)
    return inspector


def build_source(cfg: AgentConfig, plan: Plan, db: ResultsDB | None) -> FrameSource:
    """Open the source named by ``[source] url``. Raises ValueError naming the problem."""
    src = cfg.source
    scheme, target = src.scheme, src.target
    if scheme == "synthetic":
        from edge_agent.sources.synthetic import SyntheticLine

        w, _, h = src.size.partition("x")
        conditions = LineConditions(
            brightness=src.brightness, defect_rate=src.defect_rate, variant=src.variant
        )
        return SyntheticLine(
            seed=src.seed,
            size=(int(w), int(h)),
            conditions=conditions,
            fps=src.fps or 0.0,
            count=src.count,
            encode_jpeg=True,
            brightness_end=src.brightness_end,
            ramp_frames=src.ramp_frames,
        )
    if scheme == "folder":
        from edge_agent.sources.folder import FolderSource

        return FolderSource(
            Path(target),
            settle_s=src.settle_s,
            is_recorded=db.is_recorded if db is not None else None,
        )
    if scheme == "replay":
        from edge_agent.sources.replay import ReplaySource

        return ReplaySource(Path(target), fps=src.fps, realtime=src.realtime, loop=src.loop)
    from edge_agent.sources.camera import CameraSource

    width, height, fps, fourcc = plan.camera
    return CameraSource(target, width=width, height=height, fps=fps, fourcc=fourcc)


class Agent:
    """The running agent. ``run`` blocks until the source ends or ``stop`` is called."""

    def __init__(self, cfg: AgentConfig, profile: FirmwareProfile) -> None:
        self.cfg = cfg
        self.plan = build_plan(cfg, profile)
        self._stopping = threading.Event()
        self._pipeline: Pipeline | None = None
        self._source: FrameSource | None = None

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("stopping", extra={"event": "stopping", "signal": signal.Signals(signum).name})
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def stop(self) -> None:
        """Stop reading frames; frames already read are inspected and stored."""
        self._stopping.set()
        if self._pipeline is not None:
            self._pipeline.stop()
        if self._source is not None:
            self._source.close()

    def _open_model(self) -> tuple[Inspector, SlotStore | None]:
        """The model to start with: the active slot's when fleet updates are on."""
        plan = self.plan
        if not self.cfg.fleet.updates:
            return open_inspector(plan), None
        slots = open_slots(plan.state_dir, plan.bundle, self.cfg.fleet.max_bundle_mb * 1024 * 1024)
        inspector, _ = open_active_model(
            slots, lambda path: open_inspector(plan, path), plan.bundle
        )
        return inspector, slots

    def _open_transport(self) -> MqttTransport | None:
        """The agent's one MQTT connection (not started); None without a broker."""
        fleet = self.cfg.fleet
        if fleet.broker is None:
            return None
        host, port = fleet.host_port
        tls = None
        if fleet.tls_ca is not None and fleet.tls_cert is not None and fleet.tls_key is not None:
            tls = TlsFiles(fleet.tls_ca, fleet.tls_cert, fleet.tls_key)
        return MqttTransport(
            host=host,
            port=port,
            client_id=self.plan.device_id,
            tls=tls,
            will=will_of(self.plan.device_id),
        )

    def _open_telemetry(self, transport: MqttTransport | None) -> DeviceTelemetry:
        plan, tel = self.plan, self.cfg.telemetry
        settings = TelemetrySettings(
            device_id=plan.device_id,
            profile=plan.profile,
            line=self.cfg.device.line,
            state_dir=plan.state_dir,
            enabled=tel.enabled,
            window_frames=tel.window_frames,
            window_s=tel.window_s,
            check_frames=tel.check_frames,
            spool_max_bytes=tel.spool_max_bytes,
            spool_max_windows=tel.spool_max_windows,
            drift_hold_windows=tel.drift_hold_windows,
            state_interval_s=tel.state_interval_s,
        )
        try:
            # Seqs of a device whose spool was wiped start from the clock, not from 0, so
            # the server does not take its new windows for repeats of old ones.
            return DeviceTelemetry(settings, transport, first_seq=int(time.time() * 1000))
        except (SpoolError, OSError) as e:
            raise ConfigError(f"[telemetry] spool in {plan.state_dir}: {e}") from e

    def _start_updates(
        self, slots: SlotStore, pipeline: Pipeline, transport: MqttTransport
    ) -> UpdateManager:
        plan, fleet = self.plan, self.cfg.fleet
        assert fleet.root_metadata is not None  # fleet.updates is True
        try:
            root = fleet.root_metadata.read_bytes()
        except OSError as e:
            raise ConfigError(f"[fleet] root_metadata {fleet.root_metadata}: {e}") from e
        link = FleetLink(
            root_metadata=root,
            device=DeviceFacts(plan.device_id, plan.profile, frozenset(plan.runtimes)),
            state_dir=plan.state_dir,
            settings=UpdateSettings(
                gate=GateLimits(
                    max_latency_ms=plan.latency_budget_ms,
                    max_memory_mb=plan.memory_budget_mb,
                    shadow_frames=fleet.gate_frames,
                    min_agreement=fleet.gate_min_agreement,
                    timeout_s=fleet.gate_timeout_s,
                ),
                poll_interval_s=fleet.poll_interval_s,
                max_attempts=fleet.gate_max_attempts,
                max_bundle_bytes=fleet.max_bundle_mb * 1024 * 1024,
            ),
        )
        return start_updates(
            link, transport, slots, lambda path: open_inspector(plan, path), pipeline.swap
        )

    def run(self) -> int:
        plan = self.plan
        plan.state_dir.mkdir(parents=True, exist_ok=True)
        outputs = open_outputs(  # raises ConfigError naming the output's section
            self.cfg.outputs,
            plan.device_id,
            metrics=self.cfg.metrics,
            state_dir=plan.state_dir,
            open_model=lambda path: open_inspector(plan, path),
        )
        inspector, slots = self._open_model()
        db = ResultsDB.open_or_recover(
            plan.results_db,
            max_age_s=self.cfg.storage.results_max_age_days * 86400.0,
            max_rows=self.cfg.storage.results_max_rows,
        )
        evidence = EvidenceWriter(
            EvidenceStore(
                plan.evidence_dir,
                quota_bytes=plan.evidence_quota,
                pass_sample_every=self.cfg.storage.evidence_pass_every,
                jpeg_quality=self.cfg.storage.evidence_jpeg_quality,
            )
        )
        source = build_source(self.cfg, plan, db)
        pipeline = Pipeline(
            inspector,
            decode_workers=plan.decode_workers,
            queue_size=plan.queue_size,
            drop_oldest=source.live,
        )
        self._source, self._pipeline = source, pipeline
        if self._stopping.is_set():
            self.stop()
        transport = self._open_transport()
        telemetry = self._open_telemetry(transport)
        telemetry.start(inspector, time.time())  # first: the state on connect names the model
        if transport is not None:
            transport.start()
        updates: UpdateManager | None = None
        if slots is not None and transport is not None:
            updates = self._start_updates(slots, pipeline, transport)
        if outputs is not None:
            outputs.attach(pipeline, updates)  # REST status, metrics and OPC UA read the line
        log.info(
            "agent started",
            extra={
                "event": "started",
                "device": plan.device_id,
                "model": inspector.manifest.id,
                "runtime": inspector.runtime.name,
                "provider": inspector.runtime.provider,
                "source": source.name,
            },
        )
        summary = LineSummary(self.cfg.log.summary_interval_s)
        systemd = ServiceNotifier.from_environment()
        pending: dict[int, Inspection] = {}
        next_retention = time.monotonic() + RETENTION_INTERVAL_S

        results = GuardedResults(db, clock=time.monotonic)

        def acknowledge(committed: list[ResultRecord]) -> None:
            for record in committed:
                done = pending.pop(record.frame_id, None)
                if done is not None:
                    source.ack(done.frame, done.verdict.outcome.value)
            for record in results.take_given_up():
                pending.pop(record.frame_id, None)  # never acknowledged: not stored

        try:
            for item in pipeline.run_with_heartbeat(source, heartbeat_s=0.25):
                if item is not None:
                    if outputs is not None:
                        outputs.offer_inspection(item)  # first: the reject has a deadline
                    pending[item.frame.frame_id] = item
                    path = evidence.submit(item.frame, item.verdict.outcome.value)
                    acknowledge(results.add(_record(item, path)))
                    summary.add(item)
                    telemetry.add(item, pipeline.counters.dropped, time.time())
                    if updates is not None:
                        updates.offer(item.frame, item.verdict)
                    if item.inspector is not None and item.inspector is not inspector:
                        # The swapped-in model has answered: the old one is idle for good.
                        retired, inspector = inspector, item.inspector
                        retired.close()
                else:
                    acknowledge(results.flush())
                    telemetry.tick(pipeline.counters.dropped, time.time())
                now = time.monotonic()
                systemd.beat(now, pipeline.counters)  # READY=1 first, then the watchdog
                if summary.due(now):
                    summary.log(now, pipeline, source, evidence)
                if now >= next_retention and not results.failing:
                    next_retention = now + RETENTION_INTERVAL_S
                    db.enforce_retention(time.time())
        finally:
            systemd.stopping()
            if outputs is not None:
                outputs.close()
            if updates is not None:
                updates.stop()
            telemetry.stop(time.time())
            if transport is not None:
                transport.stop()
            acknowledge(_final_flush(db))
            summary.log(time.monotonic(), pipeline, source, evidence)
            evidence.close()
            db.close()
            source.close()
            inspector.close()
            if pipeline.inspector is not inspector:
                pipeline.inspector.close()
            log.info("agent stopped", extra={"event": "stopped", "inspected": summary.total})
        return 0


def _final_flush(db: ResultsDB) -> list[ResultRecord]:
    """The last commit at stop; a failure is logged (the results in memory are lost, their
    hot-folder files stay unacknowledged in the inbox), never raised past the cleanup."""
    try:
        return db.flush()
    except ResultsDBError as e:
        log.error(
            "results.db cannot commit at stop; unstored results are lost",
            extra={"event": "results_lost", "lost": db.buffered, "reason": str(e)},
        )
        return []


def _record(item: Inspection, evidence: str | None) -> ResultRecord:
    v, frame = item.verdict, item.frame
    return ResultRecord(
        frame_id=frame.frame_id,
        ts=frame.timestamp,
        source=frame.source,
        source_key=frame.key,
        model=item.model,
        p_defect=None if np.isnan(v.p_defect) else v.p_defect,
        verdict=v.outcome.value,
        latency_ms=v.latency_ms,
        error=v.error,
        evidence=evidence,
    )
