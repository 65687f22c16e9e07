"""The fleet drift monitor: detectors per device, fleet views, alerts, webhook events.

For each window (handed over by ingest in each device's seq order):

1. the model's reference (``ReferenceLibrary``); a window whose ``ref`` is not the
   reference's edges is not fed (logged once per device and model);
2. the device's ``DriftMonitor`` (``edge_agent.core.drift``; a new one when the device's
   model changes) gives alarms and per-window tests;
3. they become the device's latest ``DeviceReport``: sequential alarms (CUSUM, Bernoulli
   CUSUM) count as alarms, chi-square and KS as tests for Benjamini-Hochberg across
   devices, a test's direction being the side of the reference mean the window's mean
   is on;
4. ``fleet_drift.decide`` and ``alerts.plan_alerts`` over the scopes of this device, and
   the actions are written (``AlertStore``); opened and resolved alerts go to the
   webhook.

``on_windows`` does steps 1-3 for many windows and step 4 once, over the scopes of all
the devices fed: how the drift feed (``drift_feed.DriftFeed``) catches up when it has
fallen behind, since deciding costs as much as the fleet is large.

On start, ``rebuild`` replays the last stored windows of every device through fresh
detectors (no alerts are decided while replaying: open alerts are in the database).
Not thread-safe: the drift feed calls it from its one thread.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from edge_agent.core.drift import DriftConfig, DriftMonitor, DriftStatus, Finding
from edge_agent.protocol.state import DeviceState
from edge_agent.protocol.telemetry import TelemetryWindow
from fleet_server.domain.aggregate import FleetAggregate, merge_windows
from fleet_server.domain.alerts import AlertPolicy, plan_alerts
from fleet_server.domain.fleet_drift import (
    DeviceFinding,
    DeviceReport,
    Drift,
    FleetRule,
    GroupView,
    active_reports,
    decide,
    group_keys,
    group_views,
)
from fleet_server.storage import AlertStore, TelemetryStore
from fleet_server.workers.references import ModelReference, ReferenceLibrary

# Detectors whose alarms carry their own false-alarm control across windows.
SEQUENTIAL_TESTS = frozenset(("cusum", "bernoulli_cusum"))
DEFAULT_REPLAY_WINDOWS = 500
DEFAULT_RULE = FleetRule()
DEFAULT_POLICY = AlertPolicy()
DEFAULT_CONFIG = DriftConfig()
_SEQ_TIMES = 4096  # per device: window seq -> t0, to date a finding's since_seq


@dataclass(frozen=True, slots=True)
class FleetView:
    """One group: its drift view and the exact aggregate of its latest windows."""

    group: GroupView
    aggregates: dict[str, FleetAggregate]  # by ref (histogram edges id)


@dataclass(slots=True)
class _Device:
    model: str
    monitor: DriftMonitor
    reference: ModelReference
    status: DriftStatus | None = None
    window: TelemetryWindow | None = None


class FleetDriftMonitor:
    """Detectors for every device and the fleet-wide alert lifecycle.

    Args:
        telemetry, alerts: the stores.
        references: reference profiles by model.
        rule, policy, config: the lone-vs-many rule, the alert lifecycle, the detectors.
        notify: called with the ids of alerts opened or resolved (the webhook's enqueue).
    """

    def __init__(
        self,
        telemetry: TelemetryStore,
        alerts: AlertStore,
        references: ReferenceLibrary,
        *,
        rule: FleetRule = DEFAULT_RULE,
        policy: AlertPolicy = DEFAULT_POLICY,
        config: DriftConfig = DEFAULT_CONFIG,
        notify: Callable[[list[int]], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._telemetry = telemetry
        self._alerts = alerts
        self._references = references
        self.rule = rule
        self.policy = policy
        self._config = config
        self._notify = notify
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self._devices: dict[str, _Device] = {}
        self._meta: dict[str, tuple[str | None, str | None]] = {}  # line, profile
        self._reports: dict[str, DeviceReport] = {}
        self._seq_t: dict[str, OrderedDict[int, int]] = {}
        self._warned: set[tuple[str, str, str]] = set()
        self.fed = 0
        self.not_fed = 0

    def rebuild(self, per_device: int = DEFAULT_REPLAY_WINDOWS) -> dict[str, int]:
        """Replay stored windows into fresh detectors; returns the last seq per device.

        Raises:
            StorageError: the database cannot be read.
        """
        for info in self._telemetry.devices():
            self._meta[info.id] = (info.line, info.profile)
        last: dict[str, int] = {}
        for stored in self._telemetry.replay(per_device):
            self._feed(stored.device_id, stored.window, stored.received_at)
            last[stored.device_id] = stored.window.seq
        self._logger.info(
            "rebuilt detectors of %d devices from %d stored windows", len(last), self.fed
        )
        return last

    def on_state(self, device_id: str, state: DeviceState) -> None:
        """Take the device's line and profile from its state message."""
        line, profile = self._meta.get(device_id, (None, None))
        self._meta[device_id] = (state.line or line, state.profile or profile)

    def on_window(self, device_id: str, window: TelemetryWindow, received: datetime) -> None:
        """Feed one window (in the device's seq order) and update alerts.

        Raises:
            StorageError: the alerts cannot be read or written.
        """
        if self._feed(device_id, window, received):
            self.evaluate(device_id, received)

    def on_windows(self, items: Sequence[tuple[str, TelemetryWindow, datetime]]) -> None:
        """Feed many windows (each device's in seq order), then decide alerts once over
        the scopes of the devices fed, at the latest ``received`` time.

        Raises:
            StorageError: the alerts cannot be read or written.
        """
        fed: dict[str, None] = {}
        for device_id, window, received in items:
            if self._feed(device_id, window, received):
                fed[device_id] = None
        if fed:
            self._evaluate(fed, max(received for _, _, received in items))

    def reports(self) -> list[DeviceReport]:
        """Every device's latest report (for views)."""
        return list(self._reports.values())

    def views(self, now: datetime) -> list[FleetView]:
        """Every group now (fleet, model, profile, line): who drifts on what, and the
        exact sum of its devices' latest windows per set of edges."""
        active = active_reports(self._reports.values(), self.rule, now.timestamp())
        out = []
        for view in group_views(active, self.rule):
            pairs = [
                (d, device.window)
                for d in view.devices
                if (device := self._devices.get(d)) is not None and device.window is not None
            ]
            out.append(FleetView(view, merge_windows(pairs)))
        return out

    def evaluate(self, device_id: str | None, now: datetime) -> tuple[list[int], list[int]]:
        """Decide drifts and write alert actions over the scopes of ``device_id`` (every
        scope for None); returns (opened, resolved) alert ids."""
        return self._evaluate(None if device_id is None else (device_id,), now)

    def _evaluate(
        self, device_ids: Collection[str] | None, now: datetime
    ) -> tuple[list[int], list[int]]:
        active = self._alerts.active()
        reports = list(self._reports.values())
        drifts = decide(reports, self.rule, now.timestamp(), [a.key for a in active])
        if device_ids is None:
            evaluated = {(d.key.scope, d.key.key) for d in drifts}
            evaluated |= {(a.key.scope, a.key.key) for a in active}
        else:
            evaluated = set()
            for device_id in device_ids:
                evaluated.add(("device", device_id))
                report = self._reports.get(device_id)
                if report is not None:
                    evaluated.update(group_keys(report))
            drifts = [d for d in drifts if (d.key.scope, d.key.key) in evaluated]
        actions = plan_alerts(active, drifts, evaluated, self.policy)
        if not actions:
            return [], []
        opened, resolved = self._alerts.apply(
            actions,
            lambda drift: self._evidence(drift, now),
            now,
            webhook=self._notify is not None,
        )
        for alert_id in opened:
            record = self._alerts.get(alert_id)
            self._logger.warning(
                "alert %d opened: %s %s %s %s (%s, %d device(s))",
                alert_id,
                record.key.scope,
                record.key.key,
                record.key.feature,
                record.key.direction,
                record.test,
                len(record.devices),
            )
        for alert_id in resolved:
            folded_into = self._alerts.get(alert_id).superseded_by
            if folded_into is None:
                self._logger.info("alert %d resolved", alert_id)
            else:
                self._logger.info("alert %d resolved: folded into alert %d", alert_id, folded_into)
        if self._notify is not None and (opened or resolved):
            self._notify([*opened, *resolved])
        return opened, resolved

    def _feed(self, device_id: str, window: TelemetryWindow, received: datetime) -> bool:
        reference = self._references.get(window.model)
        if reference is None:
            self._warn_once(device_id, window.model, "no reference profile: not monitored")
            self._reports.pop(device_id, None)
            self.not_fed += 1
            return False
        if window.ref != reference.ref_id:
            self._warn_once(
                device_id,
                window.model,
                f"window edges {window.ref} are not the reference's {reference.ref_id}: "
                "stored, not monitored",
            )
            self.not_fed += 1
            return False
        device = self._devices.get(device_id)
        if device is None or device.model != window.model:
            monitor = DriftMonitor(reference.profile, reference.decision, self._config)
            device = self._devices[device_id] = _Device(window.model, monitor, reference)
        times = self._seq_t.setdefault(device_id, OrderedDict())
        times[window.seq] = window.t0
        while len(times) > _SEQ_TIMES:
            times.popitem(last=False)
        try:
            status = device.monitor.update(window)
        except ValueError as e:
            self._logger.warning("window %d of %s not monitored: %s", window.seq, device_id, e)
            return False
        if status.skipped is not None:
            return False
        self.fed += 1
        device.status, device.window = status, window
        line, profile = self._meta.get(device_id, (None, None))
        self._reports[device_id] = DeviceReport(
            device=device_id,
            model=window.model,
            line=line,
            profile=profile,
            seq=window.seq,
            received=received.timestamp(),
            findings=tuple(self._findings(device_id, status, window, reference)),
        )
        return True

    def _findings(
        self,
        device_id: str,
        status: DriftStatus,
        window: TelemetryWindow,
        reference: ModelReference,
    ) -> Iterable[DeviceFinding]:
        times = self._seq_t.get(device_id, OrderedDict())
        for finding, alarm in (
            *((f, True) for f in status.alarms if f.test in SEQUENTIAL_TESTS),
            *((f, False) for f in status.tests if f.p_value is not None),
        ):
            direction = finding.direction or _side(finding, window, reference)
            yield DeviceFinding(
                feature=finding.feature,
                test=finding.test,
                direction=direction,
                statistic=finding.statistic,
                threshold=finding.threshold,
                effect=finding.effect,
                p_value=finding.p_value,
                alarm=alarm,
                since_seq=finding.since_seq,
                since_t=times.get(finding.since_seq, window.t0),
            )

    def _evidence(self, drift: Drift, now: datetime) -> dict[str, Any]:
        """The evidence stored with an alert and sent to the webhook."""
        feature = drift.key.feature
        active = active_reports(self._reports.values(), self.rule, now.timestamp())
        group = [
            r.device for r in active if (drift.key.scope, drift.key.key) in (*group_keys(r),)
        ] or list(drift.devices)
        devices = []
        for device_id, findings in drift.evidence:
            device = self._devices.get(device_id)
            effects = () if device is None or device.status is None else device.status.effects
            devices.append(
                {
                    "device": device_id,
                    "seq": self._reports[device_id].seq if device_id in self._reports else None,
                    "findings": [_finding_json(f) for f in findings],
                    "effects": [_effect_json(f) for f in effects if f.feature == feature],
                }
            )
        return {
            "rule": {
                "share": self.rule.share,
                "min_devices": self.rule.min_devices,
                "fdr_q": self.rule.q,
            },
            "group_size": drift.group_size,
            "drifting": len(drift.devices),
            "devices": devices,
            "drifting_aggregate": self._aggregate(drift.devices, feature),
            "group_aggregate": self._aggregate(group, feature),
        }

    def _aggregate(self, device_ids: Iterable[str], feature: str) -> list[dict[str, Any]]:
        """The latest windows of ``device_ids`` summed exactly, per set of edges."""
        pairs = [
            (d, device.window)
            for d in device_ids
            if (device := self._devices.get(d)) is not None and device.window is not None
        ]
        out = []
        for ref, aggregate in sorted(merge_windows(pairs).items()):
            entry: dict[str, Any] = {
                "ref": ref,
                "devices": len(aggregate.devices),
                "frames": aggregate.frames,
            }
            if feature == "defect_rate":
                entry["fail_rate"] = _finite(aggregate.counts["fail"] / max(aggregate.frames, 1))
            else:
                entry["mean"] = _finite(aggregate.mean(feature))
            reference = next(
                (
                    dev.reference
                    for d in aggregate.devices
                    if (dev := self._devices.get(d)) is not None
                ),
                None,
            )
            if reference is not None and feature in reference.profile.features:
                entry["reference_mean"] = reference.profile.features[feature].mean
                entry["reference_std"] = reference.profile.features[feature].std
            out.append(entry)
        return out

    def _warn_once(self, device_id: str, model: str, message: str) -> None:
        if (device_id, model, message) not in self._warned:
            self._warned.add((device_id, model, message))
            self._logger.warning("%s (%s): %s", device_id, model, message)


def _side(finding: Finding, window: TelemetryWindow, reference: ModelReference) -> str:
    """Which side of the reference mean the window's mean of the feature is on."""
    m = window.moments.get(finding.feature)
    ref = reference.profile.features.get(finding.feature)
    if m is None or m.n == 0 or ref is None:
        return "shift"
    return "up" if m.mean > ref.mean else "down"


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _finding_json(f: DeviceFinding) -> dict[str, Any]:
    return {
        "test": f.test,
        "direction": f.direction,
        "statistic": _finite(f.statistic),
        "threshold": _finite(f.threshold),
        "effect": _finite(f.effect),
        "p_value": f.p_value,
        "alarm": f.alarm,
        "since_seq": f.since_seq,
        "since_t": f.since_t,
    }


def _effect_json(f: Finding) -> dict[str, Any]:
    return {
        "test": f.test,
        "value": _finite(f.statistic),
        "threshold": _finite(f.threshold),
        "exceeded": f.statistic > f.threshold,
    }
