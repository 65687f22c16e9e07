"""What the gates need of one wave's devices, read from the database.

For every device of a wave: its rollout status; the figures of its last ``gate_passed``
event for the release since the wave's assignment; telemetry totals before the switch
(its windows with the previous model in the ``BEFORE_SPAN`` before the assignment) and
after (its windows with the new model since the assignment); and the drift alerts opened
on it after its activation whose (feature, direction) was not already open then.

Window totals are kept in memory per wave: "before" is read once (it cannot change),
"after" only adds the rows not counted yet (by id), so judging a wave of a thousand
devices every second stays cheap. A restarted server reads them again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Engine, or_, select
from sqlalchemy.orm import Session

from edge_agent.protocol.events import EventKind
from fleet_server.domain.rollout_gates import DeviceHealth, WindowTotals
from fleet_server.repository.layout import release_path
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import (
    AlertRow,
    Device,
    ReleaseRow,
    RolloutDeviceRow,
    TelemetryWindowRow,
    UpdateEventRow,
)

BEFORE_SPAN: Final = timedelta(hours=1)
# Window ids are read again this far below the highest one seen: on PostgreSQL a row with
# a lower id can commit after a higher one was read (concurrent ingest transactions).
_ID_LOOKBACK: Final = 10_000
# Keeps every IN (...) list far below the bound-parameter limits of SQLite and psycopg.
_CHUNK: Final = 500


@dataclass(slots=True)
class _AfterTotals:
    last_id: int = 0
    seen: set[int] = field(default_factory=set)
    totals: dict[str, WindowTotals] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WaveKey:
    rollout_id: int
    number: int
    release_path: str
    model: str
    started_at: datetime


class WaveHealthReader:
    """Reads ``DeviceHealth`` of a wave's devices. Thread-safe.

    Raises (every method):
        StorageError: the database failed.
    """

    def __init__(self, engine: Engine) -> None:
        self._sessions = session_factory(engine)
        self._lock = threading.Lock()
        self._before: dict[WaveKey, dict[str, WindowTotals]] = {}
        self._after: dict[WaveKey, _AfterTotals] = {}

    def forget(self, key: WaveKey) -> None:
        """Drop the cached totals of a wave that is judged."""
        with self._lock:
            self._before.pop(key, None)
            self._after.pop(key, None)

    def statuses(self, key: WaveKey) -> list[DeviceHealth]:
        """Status, reason and activation time of each device (no telemetry): enough to
        judge a wave whose devices are still updating."""
        with Transaction(
            self._sessions(), f"reading wave {key.number} of rollout {key.rollout_id}"
        ) as s:
            return [_status_only(row) for row in _wave_rows(s, key)]

    def health(self, key: WaveKey) -> list[DeviceHealth]:
        """Everything the gates judge, per device of the wave."""
        what = f"reading the health of wave {key.number} of rollout {key.rollout_id}"
        with Transaction(self._sessions(), what) as session:
            rows = _wave_rows(session, key)
            ids = [r.device_id for r in rows]
            figures = _gate_figures(session, key, ids)
            before = self._before_totals(session, key, rows)
            after = self._after_totals(session, key, ids)
            alerts = _alerts(session, ids, key.started_at)
        health: list[DeviceHealth] = []
        for row in rows:
            base = _status_only(row)
            activated_at = row.activated_at
            health.append(
                DeviceHealth(
                    device_id=row.device_id,
                    status=base.status,
                    reason=base.reason,
                    activated_at=activated_at,
                    gate_passed=row.device_id in figures,
                    gate_figures=figures.get(row.device_id, {}),
                    before=before.get(row.device_id, WindowTotals()),
                    after=after.get(row.device_id, WindowTotals()),
                    new_drift_alerts=(
                        0
                        if activated_at is None
                        else _new_alerts(alerts.get(row.device_id, ()), activated_at)
                    ),
                )
            )
        return health

    def _before_totals(
        self, session: Session, key: WaveKey, rows: Sequence[RolloutDeviceRow]
    ) -> dict[str, WindowTotals]:
        with self._lock:
            cached = self._before.get(key)
        if cached is not None:
            return cached
        models = _previous_models(session, rows)
        totals: dict[str, WindowTotals] = {}
        for chunk in _chunks(list(models)):
            query = select(
                TelemetryWindowRow.device_id, TelemetryWindowRow.model, TelemetryWindowRow.window
            ).where(
                TelemetryWindowRow.device_id.in_(chunk),
                TelemetryWindowRow.received_at < key.started_at,
                TelemetryWindowRow.received_at >= key.started_at - BEFORE_SPAN,
            )
            for device_id, model, window in session.execute(query):
                if model == models[device_id]:
                    totals[device_id] = _add(totals.get(device_id, WindowTotals()), window)
        with self._lock:
            self._before[key] = totals
        return totals

    def _after_totals(
        self, session: Session, key: WaveKey, ids: Sequence[str]
    ) -> dict[str, WindowTotals]:
        with self._lock:
            state = self._after.setdefault(key, _AfterTotals())
            totals = dict(state.totals)
            seen = set(state.seen)
            last_id = state.last_id
        newest = last_id
        for chunk in _chunks(ids):
            query = select(
                TelemetryWindowRow.id, TelemetryWindowRow.device_id, TelemetryWindowRow.window
            ).where(
                TelemetryWindowRow.device_id.in_(chunk),
                TelemetryWindowRow.model == key.model,
                TelemetryWindowRow.received_at >= key.started_at,
                TelemetryWindowRow.id > last_id - _ID_LOOKBACK,
            )
            for row_id, device_id, window in session.execute(query):
                if row_id in seen:
                    continue
                seen.add(row_id)
                totals[device_id] = _add(totals.get(device_id, WindowTotals()), window)
                newest = max(newest, row_id)
        with self._lock:
            state.totals = totals
            state.seen = seen
            state.last_id = newest
        return totals


def _wave_rows(session: Session, key: WaveKey) -> list[RolloutDeviceRow]:
    return list(
        session.scalars(
            select(RolloutDeviceRow)
            .where(
                RolloutDeviceRow.rollout_id == key.rollout_id,
                RolloutDeviceRow.wave == key.number,
            )
            .order_by(RolloutDeviceRow.device_id)
        )
    )


def _status_only(row: RolloutDeviceRow) -> DeviceHealth:
    # pending: the director has not signed its assignment yet; for the gates it is still
    # updating.
    status = "assigned" if row.status == "pending" else row.status
    return DeviceHealth(row.device_id, status, row.reason, row.activated_at)


def _gate_figures(
    session: Session, key: WaveKey, ids: Sequence[str]
) -> dict[str, Mapping[str, float]]:
    """Figures of each device's last ``gate_passed`` event for the release."""
    found: dict[str, Mapping[str, float]] = {}
    for chunk in _chunks(ids):
        query = (
            select(UpdateEventRow.device_id, UpdateEventRow.figures)
            .where(
                UpdateEventRow.device_id.in_(chunk),
                UpdateEventRow.event == EventKind.GATE_PASSED.value,
                UpdateEventRow.target == key.release_path,
                UpdateEventRow.received_at >= key.started_at,
            )
            .order_by(UpdateEventRow.id)
        )
        for device_id, figures in session.execute(query):
            found[device_id] = {str(k): float(v) for k, v in (figures or {}).items()}
    return found


def _previous_models(session: Session, rows: Sequence[RolloutDeviceRow]) -> dict[str, str]:
    """device id -> the model (name@version) it ran before the rollout, where known."""
    targets = {r.previous_target for r in rows if r.previous_target}
    by_target: dict[str, str] = {}
    for chunk in _chunks(sorted(targets)):
        for path, name, version in session.execute(
            select(ReleaseRow.target_path, ReleaseRow.name, ReleaseRow.version).where(
                ReleaseRow.target_path.in_(chunk)
            )
        ):
            by_target[path] = f"{name}@{version}"
    models: dict[str, str] = {}
    unresolved = [r for r in rows if r.previous_target and r.previous_target not in by_target]
    reported: dict[str, tuple[str | None, str | None]] = {}
    for chunk in _chunks([r.device_id for r in unresolved]):
        for device_id, model, previous in session.execute(
            select(Device.id, Device.model, Device.previous_model).where(Device.id.in_(chunk))
        ):
            reported[device_id] = (model, previous)
    for row in rows:
        if not row.previous_target:
            continue
        model = by_target.get(row.previous_target)
        if model is None:
            # Not released through this server: one of the models the device reported.
            model = next(
                (
                    m
                    for m in reported.get(row.device_id, ())
                    if m and _path(m) == row.previous_target
                ),
                None,
            )
        if model is not None:
            models[row.device_id] = model
    return models


def _path(model: str) -> str | None:
    name, sep, version = model.partition("@")
    return release_path(name, version) if sep else None


def _add(totals: WindowTotals, window: Any) -> WindowTotals:
    if not isinstance(window, dict):
        return totals
    counts = window.get("counts")
    latency = window.get("latency")
    if not isinstance(counts, dict):
        return totals
    return totals.add(counts, latency if isinstance(latency, list) else None)


@dataclass(frozen=True, slots=True)
class _Alert:
    feature: str
    direction: str
    opened_at: datetime
    resolved_at: datetime | None


def _alerts(session: Session, ids: Sequence[str], since: datetime) -> dict[str, list[_Alert]]:
    """Device-scope drift alerts of ``ids`` that were open at some time after ``since``."""
    found: dict[str, list[_Alert]] = {}
    for chunk in _chunks(ids):
        query = select(
            AlertRow.scope_key,
            AlertRow.feature,
            AlertRow.direction,
            AlertRow.opened_at,
            AlertRow.resolved_at,
        ).where(
            AlertRow.scope == "device",
            AlertRow.scope_key.in_(chunk),
            or_(AlertRow.resolved_at.is_(None), AlertRow.resolved_at >= since),
        )
        for device_id, feature, direction, opened_at, resolved_at in session.execute(query):
            found.setdefault(device_id, []).append(
                _Alert(feature, direction, opened_at, resolved_at)
            )
    return found


def _new_alerts(alerts: Iterable[_Alert], activated_at: datetime) -> int:
    alerts = list(alerts)
    open_before = {
        (a.feature, a.direction)
        for a in alerts
        if a.opened_at < activated_at and (a.resolved_at is None or a.resolved_at > activated_at)
    }
    return sum(
        1
        for a in alerts
        if a.opened_at >= activated_at and (a.feature, a.direction) not in open_before
    )


def _chunks(items: Sequence[str]) -> list[list[str]]:
    return [list(items[i : i + _CHUNK]) for i in range(0, len(items), _CHUNK)]
