"""Query pieces and row shapes of ``fleet_views``: each device's newest window through the
(device_id, seq) index, open alerts by device, rollout progress, and the JSON-ready form
of a device, an update event and an alert row."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet_server.storage.schema import (
    AlertRow,
    Device,
    ReleaseRow,
    RolloutDeviceRow,
    RolloutWaveRow,
    TelemetryWindowRow,
    UpdateEventRow,
)

# Group alerts scanned for a device's membership: alerts are few (one open per scope,
# feature and direction), so a bounded newest-first scan in Python beats a JSON query
# that SQLite and PostgreSQL spell differently.
GROUP_ALERT_SCAN = 2000


def latest_windows(session: Session, device_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each device's newest window document, one index lookup per device."""
    if not device_ids:
        return {}
    inner = TelemetryWindowRow.__table__.alias("newest")
    newest_id = (
        select(inner.c.id)
        .where(inner.c.device_id == Device.id)
        .order_by(inner.c.seq.desc())
        .limit(1)
        .scalar_subquery()
    )
    out: dict[str, dict[str, Any]] = {}
    for chunk in chunks(device_ids, 500):
        query = (
            select(Device.id, TelemetryWindowRow.window)
            .join(TelemetryWindowRow, TelemetryWindowRow.id == newest_id)
            .where(Device.id.in_(chunk))
        )
        for device_id, document in session.execute(query):
            out[device_id] = document
    return out


def open_device_alert_counts(session: Session, device_ids: Sequence[str]) -> dict[str, int]:
    if not device_ids:
        return {}
    query = (
        select(AlertRow.scope_key, func.count())
        .where(
            AlertRow.resolved_at.is_(None),
            AlertRow.scope == "device",
            AlertRow.scope_key.in_(device_ids),
        )
        .group_by(AlertRow.scope_key)
    )
    return {key: int(n) for key, n in session.execute(query)}


def open_alert_features(
    session: Session, devices: dict[str, tuple[str | None, str | None]]
) -> dict[str, set[str]]:
    """Device -> features with an open alert on the device or listing it."""
    out: dict[str, set[str]] = {}
    rows = session.scalars(
        select(AlertRow).where(AlertRow.resolved_at.is_(None)).limit(GROUP_ALERT_SCAN)
    )
    for row in rows:
        members: Iterable[str] = (row.scope_key,) if row.scope == "device" else (row.devices or ())
        for device_id in members:
            if device_id in devices:
                out.setdefault(device_id, set()).add(row.feature)
    return out


def rollout_summaries(session: Session, query: Any) -> list[dict[str, Any]]:
    rows = list(session.scalars(query))
    if not rows:
        return []
    ids = [r.id for r in rows]
    releases = {
        r.id: r
        for r in session.scalars(
            select(ReleaseRow).where(ReleaseRow.id.in_({r.release_id for r in rows}))
        )
    }
    waves = dict(
        session.execute(
            select(RolloutWaveRow.rollout_id, func.count())
            .where(RolloutWaveRow.rollout_id.in_(ids))
            .group_by(RolloutWaveRow.rollout_id)
        ).all()
    )
    progress: dict[int, dict[str, int]] = {}
    for rollout_id, status, n in session.execute(
        select(RolloutDeviceRow.rollout_id, RolloutDeviceRow.status, func.count())
        .where(RolloutDeviceRow.rollout_id.in_(ids))
        .group_by(RolloutDeviceRow.rollout_id, RolloutDeviceRow.status)
    ):
        progress.setdefault(rollout_id, {})[status] = int(n)
    out = []
    for r in rows:
        release = releases.get(r.release_id)
        out.append(
            {
                "id": r.id,
                "model": None if release is None else f"{release.name}@{release.version}",
                "state": r.state,
                "current_wave": r.current_wave,
                "waves": int(waves.get(r.id, 0)),
                "progress": progress.get(r.id, {}),
                "created_by": r.created_by,
                "created_at": r.created_at,
                "updated_at": r.updated_at,
            }
        )
    return out


def models_of(session: Session, targets: set[str]) -> dict[str, str]:
    if not targets:
        return {}
    query = select(ReleaseRow.target_path, ReleaseRow.name, ReleaseRow.version).where(
        ReleaseRow.target_path.in_(targets)
    )
    return {path: f"{name}@{version}" for path, name, version in session.execute(query)}


def device_row(row: Device) -> dict[str, Any]:
    return {
        "id": row.id,
        "group": row.line,
        "site": row.site,
        "profile": row.profile,
        "model": row.model,
        "previous_model": row.previous_model,
        "edge_version": row.edge_version,
        "status": row.status,
        "drift": list(row.drift or ()),
        "spool_queued": row.spool_queued,
        "spool_dropped": row.spool_dropped,
        "first_seen": row.first_seen,
        "last_seen": row.last_seen,
    }


def event_row(row: UpdateEventRow, models: dict[str, str]) -> dict[str, Any]:
    return {
        "event": row.event,
        "ts": row.ts,
        "at": row.received_at,
        "target": row.target,
        "model": models.get(row.target or ""),
        "percent": row.percent,
        "reason": row.reason,
        "detail": row.detail,
        "figures": dict(row.figures or {}),
    }


def alert_row(row: AlertRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "scope": row.scope,
        "key": row.scope_key,
        "feature": row.feature,
        "direction": row.direction,
        "test": row.test,
        "effect": row.effect,
        "devices": list(row.devices or ()),
        "since": row.since_t,
        "opened_at": row.opened_at,
        "resolved_at": row.resolved_at,
    }


def chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
