"""Drift alerts in the database: what ``domain.alerts.plan_alerts`` decided, written down.

``AlertStore.apply`` writes one evaluation's actions in one transaction: opens first
(so an alert folded into a new one can point at it), then renewals, quiet counts and
resolutions. Webhook delivery status is written separately by the webhook sender.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, select

from fleet_server.domain.alerts import (
    ActiveAlert,
    AlertAction,
    OpenAlert,
    QuietAlert,
    RenewAlert,
    ResolveAlert,
)
from fleet_server.domain.fleet_drift import SCOPES, AlertKey, Drift
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import WEBHOOK_STATUSES, AlertRow

Evidence = Callable[[Drift], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """An alert as stored (a plain copy of its row)."""

    id: int
    key: AlertKey
    test: str
    effect: float | None
    statistic: float
    threshold: float
    p_value: float | None
    since_seq: int
    since_t: datetime
    devices: tuple[str, ...]
    evidence: dict[str, Any]
    opened_at: datetime
    updated_at: datetime
    resolved_at: datetime | None
    superseded_by: int | None
    quiet: int
    webhook_status: str
    webhook_event: str | None
    webhook_attempts: int
    webhook_error: str | None

    def document(self) -> dict[str, Any]:
        """The alert as JSON-ready data (what the webhook receives under ``alert``)."""
        return {
            "id": self.id,
            "scope": self.key.scope,
            "scope_key": self.key.key,
            "feature": self.key.feature,
            "direction": self.key.direction,
            "test": self.test,
            "effect": self.effect,
            "statistic": self.statistic,
            "threshold": self.threshold,
            "p_value": self.p_value,
            "since": {"seq": self.since_seq, "t": _iso(self.since_t)},
            "devices": list(self.devices),
            "opened_at": _iso(self.opened_at),
            "resolved_at": None if self.resolved_at is None else _iso(self.resolved_at),
            "superseded_by": self.superseded_by,
            "evidence": self.evidence,
        }


class AlertStore:
    """Alerts. Safe to use from several threads (a session per call).

    Raises (every method):
        StorageError: the database failed.
    """

    def __init__(self, engine: Engine) -> None:
        self._sessions = session_factory(engine)

    def active(self) -> list[ActiveAlert]:
        """The open alerts, by id."""
        with self._transaction("reading open alerts") as session:
            rows = session.scalars(
                select(AlertRow).where(AlertRow.resolved_at.is_(None)).order_by(AlertRow.id)
            )
            return [ActiveAlert(row.id, _key(row), row.quiet) for row in rows]

    def apply(
        self,
        actions: Sequence[AlertAction],
        evidence: Evidence,
        now: datetime,
        *,
        webhook: bool,
    ) -> tuple[list[int], list[int]]:
        """Write one evaluation's actions; returns (opened ids, resolved ids).

        ``evidence(drift)`` gives the evidence JSON of an opened or renewed alert. With
        ``webhook``, opened and resolved alerts are marked ``pending`` delivery.
        """
        opened: list[int] = []
        resolved: list[int] = []
        with self._transaction("writing alerts") as session:
            ids: dict[AlertKey, int] = {}
            for action in actions:
                if isinstance(action, OpenAlert):
                    row = AlertRow(opened_at=now, quiet=0, webhook_attempts=0)
                    _fill(row, action.drift, evidence(action.drift), now)
                    row.webhook_status = "pending" if webhook else "none"
                    row.webhook_event = "alert.opened" if webhook else None
                    session.add(row)
                    session.flush()
                    ids[action.drift.key] = row.id
                    opened.append(row.id)
            for row in session.scalars(select(AlertRow).where(AlertRow.resolved_at.is_(None))):
                ids.setdefault(_key(row), row.id)
            for action in actions:
                if isinstance(action, RenewAlert):
                    row = _row(session, action.alert_id)
                    _fill(row, action.drift, evidence(action.drift), now)
                    row.quiet = 0
                elif isinstance(action, QuietAlert):
                    _row(session, action.alert_id).quiet = action.quiet
                elif isinstance(action, ResolveAlert):
                    row = _row(session, action.alert_id)
                    row.resolved_at = now
                    row.updated_at = now
                    if action.superseded_by is not None:
                        row.superseded_by = ids.get(action.superseded_by)
                    if webhook:
                        row.webhook_status, row.webhook_event = "pending", "alert.resolved"
                        row.webhook_attempts, row.webhook_error = 0, None
                    resolved.append(row.id)
        return opened, resolved

    def get(self, alert_id: int) -> AlertRecord:
        """Raises: KeyError naming the id when there is no such alert."""
        with self._transaction(f"reading alert {alert_id}") as session:
            row = session.get(AlertRow, alert_id)
            if row is None:
                raise KeyError(f"no alert {alert_id}")
            return _record(row)

    def alerts(self, *, open_only: bool = False) -> list[AlertRecord]:
        """Every alert (or the open ones), by id."""
        with self._transaction("listing alerts") as session:
            query = select(AlertRow).order_by(AlertRow.id)
            if open_only:
                query = query.where(AlertRow.resolved_at.is_(None))
            return [_record(row) for row in session.scalars(query)]

    def pending_webhooks(self) -> list[int]:
        """Alerts whose last event has not been delivered yet (after a restart)."""
        with self._transaction("reading pending webhooks") as session:
            query = select(AlertRow.id).where(AlertRow.webhook_status == "pending")
            return list(session.scalars(query.order_by(AlertRow.id)))

    def record_delivery(
        self, alert_id: int, status: str, attempts: int, error: str | None, now: datetime
    ) -> None:
        """Write the webhook outcome of an alert's last event.

        Raises:
            ValueError: an unknown status.
        """
        if status not in WEBHOOK_STATUSES:
            raise ValueError(f"unknown webhook status {status!r}")
        with self._transaction(f"recording webhook delivery of alert {alert_id}") as session:
            row = _row(session, alert_id)
            row.webhook_status = status
            row.webhook_attempts = attempts
            row.webhook_error = None if error is None else error[:400]
            row.webhook_at = now

    def _transaction(self, what: str) -> Transaction:
        return Transaction(self._sessions(), what)


def _fill(row: AlertRow, drift: Drift, evidence: dict[str, Any], now: datetime) -> None:
    head = drift.strongest
    since_t, since_seq = drift.since
    row.scope, row.scope_key = drift.key.scope, drift.key.key
    row.feature, row.direction = drift.key.feature, drift.key.direction
    row.test = head.test
    row.effect = head.effect
    row.statistic = head.statistic
    row.threshold = head.threshold
    row.p_value = head.p_value
    since = datetime.fromtimestamp(since_t, timezone.utc)
    # A renewal keeps the alert's start: a CUSUM restarts after each alarm, so the
    # latest evidence dates from a later window than the drift.
    if row.since_t is None or since < row.since_t:
        row.since_seq, row.since_t = since_seq, since
    row.devices = list(drift.devices)
    row.evidence = evidence
    row.updated_at = now


def _row(session: Any, alert_id: int) -> AlertRow:
    row = session.get(AlertRow, alert_id)
    if not isinstance(row, AlertRow):
        raise KeyError(f"no alert {alert_id}")
    return row


def _key(row: AlertRow) -> AlertKey:
    scope = next((s for s in SCOPES if s == row.scope), None)
    if scope is None:
        raise ValueError(f"alert {row.id} has an unknown scope {row.scope!r}")
    return AlertKey(scope, row.scope_key, row.feature, row.direction)


def _record(row: AlertRow) -> AlertRecord:
    return AlertRecord(
        id=row.id,
        key=_key(row),
        test=row.test,
        effect=row.effect,
        statistic=row.statistic,
        threshold=row.threshold,
        p_value=row.p_value,
        since_seq=row.since_seq,
        since_t=row.since_t,
        devices=tuple(row.devices),
        evidence=dict(row.evidence),
        opened_at=row.opened_at,
        updated_at=row.updated_at,
        resolved_at=row.resolved_at,
        superseded_by=row.superseded_by,
        quiet=row.quiet,
        webhook_status=row.webhook_status,
        webhook_event=row.webhook_event,
        webhook_attempts=row.webhook_attempts,
        webhook_error=row.webhook_error,
    )


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")
