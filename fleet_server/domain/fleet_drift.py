"""Fleet drift views, and the rule that tells one drifting device from many.

Input: each device's latest ``DeviceReport`` (what its drift monitor said about its last
window: sequential alarms such as CUSUM, and per-window tests such as chi-square and KS
with p-values), with the device's line, firmware profile and model.

Groups: every active device (a report received within ``stale_after_s``) belongs to
``fleet/*``, ``model/<name@version>``, ``profile/<profile>`` and ``line/<line>`` (the
last two when its state message names them).

Who drifts, per group G and feature f (``group_views``): a device drifts on (f, d), d a
direction such as ``up`` or ``down``, when

- one of its alarms is on f in direction d (alarms carry their own false-alarm
  control), or
- its per-window tests of f are significant after Benjamini-Hochberg at FDR ``q``
  across the devices of G: one p-value per device and feature, the smallest p of its
  tests of f times the number of those tests (Bonferroni within the device), and the
  test's direction is d.

The lone-vs-many rule (``decide``): a group G has a group drift on (f, d) when at least
``min_devices`` (default 2) devices drift on (f, d) and they are at least ``share``
(default 0.3) of G's active devices. Groups are taken broadest first (fleet, model,
profile, line); a group whose drifting devices are all covered already (by a broader
group drift decided now, or by an open alert of a broader group on (f, d)) adds
nothing. A device drifting on (f, d) (decided with BH across the whole fleet) that no
group drift and no open group alert on (f, d) covers is a device drift: one camera or one
lamp, not a new variant. Each decision names the open alerts it covers (device alerts of
its devices, alerts of narrower groups whose members it holds): the alert lifecycle
folds them into it.

Pure: reports and time come in as arguments.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

from edge_agent.core.drift_tests import benjamini_hochberg

Scope = Literal["device", "line", "profile", "model", "fleet"]
SCOPES: Final[tuple[Scope, ...]] = ("device", "line", "profile", "model", "fleet")
# Broadest first: the order in which group drifts are decided.
GROUP_SCOPES: Final[tuple[Scope, ...]] = ("fleet", "model", "profile", "line")
FLEET_KEY: Final = "*"


class AlertKey(NamedTuple):
    """What an alert is about: one feature drifting one way in one scope."""

    scope: Scope
    key: str
    feature: str
    direction: str


@dataclass(frozen=True, slots=True)
class DeviceFinding:
    """One result of a device's drift monitor on one feature, for its latest window.

    ``alarm`` is True for a sequential detector's alarm (p_value may be None), False for
    a per-window test (p_value is its p-value; it counts only if significant after BH).
    ``since_seq``/``since_t`` say from which window (sequence number, unix seconds) on.
    """

    feature: str
    test: str
    direction: str
    statistic: float
    threshold: float
    effect: float | None
    p_value: float | None
    alarm: bool
    since_seq: int
    since_t: int


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """A device's latest drift results. ``received`` is the server's time (unix s)."""

    device: str
    model: str
    line: str | None
    profile: str | None
    seq: int
    received: float
    findings: tuple[DeviceFinding, ...]


@dataclass(frozen=True, slots=True)
class FleetRule:
    """The lone-vs-many rule's parameters (see the module docstring).

    Raises:
        ValueError: share outside (0, 1], min_devices < 1, q outside (0, 1), or a
            non-positive stale_after_s.
    """

    share: float = 0.3
    min_devices: int = 2
    q: float = 1e-4
    stale_after_s: float = 900.0

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {self.share}")
        if self.min_devices < 1:
            raise ValueError(f"min_devices must be >= 1, got {self.min_devices}")
        if not 0.0 < self.q < 1.0:
            raise ValueError(f"q must be in (0, 1), got {self.q}")
        if not self.stale_after_s > 0:
            raise ValueError(f"stale_after_s must be > 0, got {self.stale_after_s}")

    def needed(self, group_size: int) -> int:
        """Drifting devices a group of ``group_size`` needs for a group drift."""
        return max(self.min_devices, math.ceil(self.share * group_size - 1e-9))


@dataclass(frozen=True, slots=True)
class GroupView:
    """One group now: its active devices and who drifts on what.

    ``drifting[(feature, direction)]`` lists ``(device, findings)`` per drifting device,
    findings strongest first (alarms, then by p-value).
    """

    scope: Scope
    key: str
    devices: tuple[str, ...]
    drifting: dict[tuple[str, str], tuple[tuple[str, tuple[DeviceFinding, ...]], ...]]


@dataclass(frozen=True, slots=True)
class Drift:
    """A decision: (feature, direction) drifts in one scope; what an alert is about.

    ``devices`` are the drifting devices (one for a device drift), ``group_size`` the
    group's active devices, ``evidence`` each drifting device's findings, ``covers`` the
    open alerts this drift takes over.
    """

    key: AlertKey
    devices: tuple[str, ...]
    group_size: int
    evidence: tuple[tuple[str, tuple[DeviceFinding, ...]], ...]
    covers: tuple[AlertKey, ...] = ()

    @property
    def strongest(self) -> DeviceFinding:
        """The finding that heads the evidence (an alarm if any, else the smallest p)."""
        return min((f[0] for _, f in self.evidence), key=_strength)

    @property
    def since(self) -> tuple[int, int]:
        """The earliest (since_t, since_seq) over the evidence."""
        return min((f.since_t, f.since_seq) for _, found in self.evidence for f in found)


def active_reports(
    reports: Iterable[DeviceReport], rule: FleetRule, now: float
) -> list[DeviceReport]:
    """The reports received within ``rule.stale_after_s`` of ``now``, by device id."""
    return sorted(
        (r for r in reports if now - r.received <= rule.stale_after_s), key=lambda r: r.device
    )


def group_keys(report: DeviceReport) -> list[tuple[Scope, str]]:
    """The groups a device belongs to, broadest first."""
    keys: list[tuple[Scope, str]] = [("fleet", FLEET_KEY), ("model", report.model)]
    if report.profile is not None:
        keys.append(("profile", report.profile))
    if report.line is not None:
        keys.append(("line", report.line))
    return keys


def group_views(reports: Sequence[DeviceReport], rule: FleetRule) -> list[GroupView]:
    """Every group of ``reports`` (already filtered by ``active_reports``), broadest
    scope first, keys sorted."""
    members: dict[tuple[Scope, str], list[DeviceReport]] = {}
    for report in reports:
        for scope_key in group_keys(report):
            members.setdefault(scope_key, []).append(report)
    order = {scope: i for i, scope in enumerate(GROUP_SCOPES)}
    views = []
    for (scope, key), group in sorted(members.items(), key=lambda g: (order[g[0][0]], g[0][1])):
        views.append(
            GroupView(
                scope=scope,
                key=key,
                devices=tuple(r.device for r in group),
                drifting=_drifting(group, rule.q),
            )
        )
    return views


def decide(
    reports: Iterable[DeviceReport],
    rule: FleetRule,
    now: float,
    open_alerts: Collection[AlertKey] = (),
) -> list[Drift]:
    """Group drifts and device drifts now (the rule in the module docstring).

    Args:
        reports: each device's latest report (stale ones are left out here).
        rule: share, minimum devices, FDR q, staleness.
        now: the server's time, unix seconds.
        open_alerts: keys of the alerts open now (they cover devices and narrower groups
            while they are open).
    """
    views = group_views(active_reports(reports, rule, now), rule)
    members = {(v.scope, v.key): set(v.devices) for v in views}
    by_open: dict[tuple[str, str], set[str]] = {}
    for k in open_alerts:
        if k.scope != "device":
            by_open.setdefault((k.feature, k.direction), set()).update(
                members.get((k.scope, k.key), ())
            )
    by_chosen: dict[tuple[str, str], set[str]] = {}
    drifts: list[Drift] = []
    for view in views:
        for (feature, direction), found in sorted(view.drifting.items()):
            devices = set(device for device, _ in found)
            if len(devices) < rule.needed(len(view.devices)):
                continue
            key = AlertKey(view.scope, view.key, feature, direction)
            chosen = by_chosen.setdefault((feature, direction), set())
            if devices <= chosen:
                continue  # a broader group drift decided now holds them all
            if key not in open_alerts and devices <= by_open.get((feature, direction), set()):
                continue  # an open alert of a broader group holds them all
            chosen.update(view.devices)
            covers = [
                k
                for k in open_alerts
                if k != key
                and (k.feature, k.direction) == (feature, direction)
                and _narrower(k, view, members)
            ]
            drifts.append(
                Drift(key, tuple(sorted(devices)), len(view.devices), found, tuple(sorted(covers)))
            )
    fleet = next((v for v in views if v.scope == "fleet"), None)
    if fleet is None:
        return drifts
    for (feature, direction), found in sorted(fleet.drifting.items()):
        taken = by_chosen.get((feature, direction), set()) | by_open.get(
            (feature, direction), set()
        )
        for device, findings in found:
            if device not in taken:
                key = AlertKey("device", device, feature, direction)
                drifts.append(Drift(key, (device,), 1, ((device, findings),)))
    return drifts


def _narrower(k: AlertKey, view: GroupView, members: dict[tuple[Scope, str], set[str]]) -> bool:
    if k.scope == "device":
        return k.key in view.devices
    if GROUP_SCOPES.index(k.scope) <= GROUP_SCOPES.index(view.scope):
        return False
    group = members.get((k.scope, k.key))
    return group is not None and group <= set(view.devices)


def _strength(f: DeviceFinding) -> tuple[int, float, str]:
    return (0 if f.alarm else 1, 1.0 if f.p_value is None else f.p_value, f.test)


def _drifting(
    group: Sequence[DeviceReport], q: float
) -> dict[tuple[str, str], tuple[tuple[str, tuple[DeviceFinding, ...]], ...]]:
    """Who drifts on what in one group: alarms as they are, tests through BH."""
    hits: dict[tuple[str, str], dict[str, list[DeviceFinding]]] = {}
    tests: dict[str, list[tuple[str, float, list[DeviceFinding]]]] = {}
    for report in group:
        per_feature: dict[str, list[DeviceFinding]] = {}
        for f in report.findings:
            if f.alarm:
                hits.setdefault((f.feature, f.direction), {}).setdefault(report.device, []).append(
                    f
                )
            elif f.p_value is not None:
                per_feature.setdefault(f.feature, []).append(f)
        for feature, found in per_feature.items():
            p_values = [f.p_value for f in found if f.p_value is not None]
            p = min(1.0, min(p_values) * len(p_values))
            tests.setdefault(feature, []).append((report.device, p, found))
    for items in tests.values():
        rejected = benjamini_hochberg([p for _, p, _ in items], q)
        # The largest combined p that BH rejected: a device's test counts as evidence when
        # its own Bonferroni-adjusted p is no larger (the test that made it significant).
        cut = max((p for (_, p, _), r in zip(items, rejected, strict=True) if r), default=-1.0)
        for (device, _, found), reject in zip(items, rejected, strict=True):
            if not reject:
                continue
            for f in found:
                if f.p_value is not None and min(1.0, f.p_value * len(found)) <= cut:
                    hits.setdefault((f.feature, f.direction), {}).setdefault(device, []).append(f)
    return {
        fd: tuple(
            (device, tuple(sorted(found, key=_strength))) for device, found in sorted(by.items())
        )
        for fd, by in hits.items()
    }
