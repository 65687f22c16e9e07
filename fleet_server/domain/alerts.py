"""The alert lifecycle: which alerts to open, renew, let go quiet, resolve or fold.

An alert is keyed by ``AlertKey`` (scope, scope key, feature, direction); at most one
alert per key is open. Each evaluation (``plan_alerts``) takes the open alerts, the
drifts ``fleet_drift.decide`` found, and the scopes the evaluation looked at (those of
the device whose window triggered it), and returns actions:

- ``OpenAlert``: a drift with no open alert on its key;
- ``RenewAlert``: a drift whose alert is open: fresh evidence, quiet count back to 0;
- ``QuietAlert``: an open alert in an evaluated scope whose drift was not found: one more
  quiet evaluation;
- ``ResolveAlert``: after ``resolve_after`` quiet evaluations in a row (the stream is back
  to normal), or at once when a drift covers the alert (``superseded_by``: a lone device
  that turned out to be one of many; a line inside a fleet-wide change).

Alerts of scopes not evaluated are left alone: a device alert goes quiet only on that
device's own windows, a line alert only on windows of that line. Pure.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from fleet_server.domain.fleet_drift import AlertKey, Drift


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    """``resolve_after``: quiet evaluations in a row before an alert is resolved.

    Raises:
        ValueError: resolve_after < 1.
    """

    resolve_after: int = 3

    def __post_init__(self) -> None:
        if self.resolve_after < 1:
            raise ValueError(f"resolve_after must be >= 1, got {self.resolve_after}")


@dataclass(frozen=True, slots=True)
class ActiveAlert:
    """An open alert as the lifecycle sees it."""

    id: int
    key: AlertKey
    quiet: int = 0


@dataclass(frozen=True, slots=True)
class OpenAlert:
    drift: Drift


@dataclass(frozen=True, slots=True)
class RenewAlert:
    alert_id: int
    drift: Drift


@dataclass(frozen=True, slots=True)
class QuietAlert:
    alert_id: int
    quiet: int


@dataclass(frozen=True, slots=True)
class ResolveAlert:
    alert_id: int
    superseded_by: AlertKey | None = None


AlertAction = OpenAlert | RenewAlert | QuietAlert | ResolveAlert


def plan_alerts(
    active: Iterable[ActiveAlert],
    drifts: Sequence[Drift],
    evaluated: Collection[tuple[str, str]],
    policy: AlertPolicy,
) -> list[AlertAction]:
    """The actions for one evaluation, in a stable order: opens and renewals (in the
    order of ``drifts``), then quiet and resolved alerts (by id).

    Args:
        active: the open alerts (at most one per key).
        drifts: what ``fleet_drift.decide`` found now.
        evaluated: ``(scope, key)`` of every scope this evaluation looked at.
        policy: when a quiet alert is resolved.

    Raises:
        ValueError: two open alerts share a key, or two drifts do.
    """
    by_key: dict[AlertKey, ActiveAlert] = {}
    for alert in active:
        if alert.key in by_key:
            raise ValueError(f"alerts {by_key[alert.key].id} and {alert.id} share {alert.key}")
        by_key[alert.key] = alert
    wanted: dict[AlertKey, Drift] = {}
    for drift in drifts:
        if drift.key in wanted:
            raise ValueError(f"two drifts on {drift.key}")
        wanted[drift.key] = drift
    superseded: dict[int, AlertKey] = {}
    for drift in drifts:
        for covered in drift.covers:
            folded = by_key.get(covered)
            if folded is not None and covered not in wanted:
                superseded.setdefault(folded.id, drift.key)
    actions: list[AlertAction] = []
    for drift in drifts:
        existing = by_key.get(drift.key)
        actions.append(OpenAlert(drift) if existing is None else RenewAlert(existing.id, drift))
    for alert in sorted(by_key.values(), key=lambda a: a.id):
        if alert.id in superseded:
            actions.append(ResolveAlert(alert.id, superseded[alert.id]))
        elif alert.key not in wanted and (alert.key.scope, alert.key.key) in evaluated:
            quiet = alert.quiet + 1
            if quiet >= policy.resolve_after:
                actions.append(ResolveAlert(alert.id))
            else:
                actions.append(QuietAlert(alert.id, quiet))
    return actions
