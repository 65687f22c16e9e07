"""``edge-agent check``: validate everything the agent needs and say what would run.

Unlike the service, which stops at the first fatal problem, the check keeps going and
reports every problem it finds, so one run of ``check`` fixes a whole config.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.config import AgentConfig, ConfigError, FirmwareProfile, load_config, load_profile
from edge_agent.protocol.errors import BundleError
from edge_agent.runtimes.base import ModelLoadError
from edge_agent.service import Plan, build_plan, open_inspector

_MB = 1024 * 1024


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_config(path: Path) -> CheckReport:
    """Check the config at ``path``.

    Raises:
        ConfigError: the config file itself is missing or invalid (nothing else can be
            checked without it).
    """
    cfg = load_config(path)
    report = CheckReport()
    try:
        profile = load_profile(cfg.device.profile)
    except ConfigError as e:
        report.problems.append(f"[device] profile: {e}")
        return report
    plan = build_plan(cfg, profile)
    report.lines.append(
        f"device      {cfg.device.id} (profile {profile.name}: {profile.description})"
    )
    _check_model(plan, profile, report)
    _check_source(cfg, plan, report)
    _check_storage(plan, report)
    _check_fleet(cfg, plan, report)
    _check_outputs(cfg, report)
    return report


def _check_fleet(cfg: AgentConfig, plan: Plan, report: CheckReport) -> None:
    fleet, tel = cfg.fleet, cfg.telemetry
    if tel.enabled:
        sent = f"sent to {fleet.broker}" if fleet.enabled else "local drift check only, no broker"
        report.lines.append(
            f"telemetry   windows of {tel.window_frames} frames or {tel.window_s:g} s ({sent}); "
            f"spool {tel.spool_max_mb:g} MB / {tel.spool_max_windows} windows; "
            f"local drift check every {tel.check_frames} frames"
        )
    else:
        report.lines.append("telemetry   off ([telemetry] enabled = false)")
    if not fleet.enabled:
        report.lines.append("updates     off ([fleet] broker not set)")
        return
    root = fleet.root_metadata
    if root is None:
        report.lines.append("updates     off ([fleet] root_metadata not set)")
        return
    if not root.is_file():
        report.problems.append(f"[fleet] root_metadata: {root} is not a file")
        return
    report.lines.append(
        f"updates     from {fleet.broker}, trust root {root}; gate {fleet.gate_frames} frames, "
        f"agreement >= {fleet.gate_min_agreement}, p99 <= {plan.latency_budget_ms:g} ms, "
        f"RSS <= {plan.memory_budget_mb:g} MB"
    )


def _check_model(plan: Plan, profile: FirmwareProfile, report: CheckReport) -> None:
    try:
        inspector = open_inspector(plan)
    except (BundleError, ModelLoadError, ConfigError) as e:
        report.problems.append(f"[model] bundle {plan.bundle}: {e}")
        return
    m = inspector.manifest
    rt = inspector.runtime
    report.lines.append(f"model       {m.id} from {plan.bundle}")
    report.lines.append(
        f"runtime     {rt.name}, provider {rt.provider}, {plan.runtime_options.threads} "
        f"thread(s), {plan.decode_workers} decode worker(s)"
    )
    d = inspector.decision
    report.lines.append(f"decision    fail >= {d.t_fail}, uncertain >= {d.t_uncertain}")
    if m.runtime.value not in profile.runtimes:
        report.problems.append(
            f"[model] bundle runtime {m.runtime.value!r} is not one profile {profile.name} "
            f"runs ({', '.join(profile.runtimes)})"
        )
    bad = [r for r in inspector.self_test() if not r.ok]
    for r in bad:
        report.problems.append(
            f"[model] golden sample {r.file}: expected P(defect) {r.expected:.4f}, got {r.got:.4f}"
        )
    if m.golden and not bad:
        report.lines.append(f"self-test   {len(m.golden)} golden samples match")
    inspector.close()


def _check_source(cfg: AgentConfig, plan: Plan, report: CheckReport) -> None:
    src = cfg.source
    target = Path(src.target)
    if src.scheme == "folder":
        if not target.is_dir():
            report.problems.append(f"[source] url: hot folder {target} does not exist")
        elif not os.access(target, os.W_OK | os.X_OK):
            report.problems.append(f"[source] url: hot folder {target} is not writable")
        report.lines.append(f"source      hot folder {target} (settle {src.settle_s} s)")
    elif src.scheme == "replay":
        if not target.exists():
            report.problems.append(f"[source] url: replay path {target} does not exist")
        report.lines.append(
            f"source      replay {target} (realtime {src.realtime}, loop {src.loop})"
        )
    elif src.scheme == "synthetic":
        report.lines.append(
            f"source      synthetic line seed {src.seed}, {src.size}, defect rate "
            f"{src.defect_rate}, brightness {src.brightness}"
        )
    else:
        w, h, fps, fourcc = plan.camera
        report.lines.append(f"source      camera {src.target} {w}x{h} @ {fps:g} fps {fourcc}")
        if src.target.startswith("/dev/") and not Path(src.target).exists():
            report.problems.append(f"[source] url: camera device {src.target} does not exist")


def _check_storage(plan: Plan, report: CheckReport) -> None:
    state = plan.state_dir
    existing = state
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        report.problems.append(f"[storage] state_dir: {state} is not writable")
    quota = sum(plan.evidence_quota.values())
    report.lines.append(f"results     {plan.results_db}")
    shares = ", ".join(f"{k} {v // _MB} MB" for k, v in plan.evidence_quota.items() if v)
    report.lines.append(f"evidence    {plan.evidence_dir} (quota {quota // _MB} MB: {shares})")
    free = shutil.disk_usage(existing).free
    if quota > free:
        report.problems.append(
            f"[storage] evidence_quota_mb: quota {quota // _MB} MB exceeds free space "
            f"{free // _MB} MB on {existing}"
        )


def _check_outputs(cfg: AgentConfig, report: CheckReport) -> None:
    out = cfg.outputs
    if out.reject is None and out.mqtt is None:
        report.lines.append("outputs     none ([outputs] not set)")
        return
    if out.reject is not None:
        r = out.reject
        report.lines.append(
            f"reject      {r.pulse_ms:g} ms pulse on line {r.line!r} of {r.chip}, "
            f"{r.delay_ms:g} ms after capture, on {', '.join(r.outcomes)}"
        )
    if out.mqtt is not None:
        m = out.mqtt
        report.lines.append(f"verdicts    to {m.broker} topic {m.topic!r}, QoS {m.qos}")
