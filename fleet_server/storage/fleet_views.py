"""Read-only views of the fleet that the console and the REST API share.

Every method is one short read transaction and returns JSON-ready data (times as aware
datetimes; the API and the templates format them). The queries stay fast with a thousand
devices and a million stored windows:

- ``overview`` reads devices, alerts and rollouts only, never telemetry windows;
- a device's windows are read through the (device_id, seq) unique index, newest first,
  with a LIMIT;
- "the latest window of each device" (``heatmap``, ``groups``) is one correlated
  subquery per device on that same index, never a scan or a GROUP BY over windows.

"Group" is the device's line (what its state message reports).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Engine, case, func, select

from edge_agent.protocol.manifest import FEATURE_NAMES
from fleet_server.storage import view_queries as vq
from fleet_server.storage import window_summary as ws
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import (
    AlertRow,
    Device,
    RolloutRow,
    TelemetryWindowRow,
    UpdateEventRow,
)
from fleet_server.workers.references import ModelReference

STATUSES = ("online", "offline", "unknown")
ACTIVE_ROLLOUT_STATES = ("pending", "running", "paused", "halted")
OVERVIEW_ALERTS = 20
MAX_PAGE = 1000
HEATMAP_LIMIT = 500
_FIVE_MINUTES = timedelta(minutes=5)
_HISTORY_EVENTS = ("activated", "rolled_back")


class References(Protocol):
    """Reference profiles by model id (``fleet_server.workers.references.ReferenceLibrary``)."""

    def get(self, model: str) -> ModelReference | None: ...


class FleetViews:
    """Read-only fleet queries. Thread-safe (a session per call).

    Args:
        engine: the fleet database.
        references: reference profiles for bands and standardized shifts; without it
            ``reference_band`` is None and heatmap cells are None.

    Raises (every method):
        StorageError: the database failed (the message says what was being read).
    """

    def __init__(self, engine: Engine, references: References | None = None) -> None:
        self._sessions = session_factory(engine)
        self._references = references

    # -- overview ---------------------------------------------------------------------

    def overview(self, now: datetime) -> dict[str, Any]:
        """Devices by status, model and group; the newest open alerts; active rollouts.

        ``devices.seen_5m`` counts devices heard from in the five minutes before ``now``.
        """
        online = func.sum(case((Device.status == "online", 1), else_=0))
        offline = func.sum(case((Device.status == "offline", 1), else_=0))
        with self._read("reading the fleet overview") as session:
            by_status = dict(
                session.execute(select(Device.status, func.count()).group_by(Device.status)).all()
            )
            seen = session.scalar(
                select(func.count())
                .select_from(Device)
                .where(Device.last_seen >= now - _FIVE_MINUTES)
            )
            by_model = [
                {"model": model, "devices": int(n), "online": int(on or 0)}
                for model, n, on in session.execute(
                    select(Device.model, func.count(), online)
                    .group_by(Device.model)
                    .order_by(func.count().desc(), Device.model)
                )
            ]
            by_group = [
                {
                    "group": group,
                    "devices": int(n),
                    "online": int(on or 0),
                    "offline": int(off or 0),
                }
                for group, n, on, off in session.execute(
                    select(Device.line, func.count(), online, offline)
                    .group_by(Device.line)
                    .order_by(Device.line)
                )
            ]
            open_alerts = AlertRow.resolved_at.is_(None)
            alerts = [
                vq.alert_row(row)
                for row in session.scalars(
                    select(AlertRow)
                    .where(open_alerts)
                    .order_by(AlertRow.opened_at.desc(), AlertRow.id.desc())
                    .limit(OVERVIEW_ALERTS)
                )
            ]
            alerts_total = session.scalar(
                select(func.count()).select_from(AlertRow).where(open_alerts)
            )
            rollouts = vq.rollout_summaries(
                session,
                select(RolloutRow)
                .where(RolloutRow.state.in_(ACTIVE_ROLLOUT_STATES))
                .order_by(RolloutRow.id.desc()),
            )
        counts = {s: int(by_status.get(s, 0)) for s in STATUSES}
        other = sum(int(n) for s, n in by_status.items() if s not in STATUSES)
        counts["unknown"] += other
        return {
            "generated_at": now,
            "devices": {"total": sum(counts.values()), **counts, "seen_5m": int(seen or 0)},
            "by_model": by_model,
            "by_group": by_group,
            "open_alerts": alerts,
            "open_alerts_total": int(alerts_total or 0),
            "rollouts": rollouts,
        }

    # -- devices ----------------------------------------------------------------------

    def devices(
        self,
        *,
        group: str | None = None,
        site: str | None = None,
        profile: str | None = None,
        model: str | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[dict[str, Any]], int]:
        """A page of devices (by id) matching every given filter, and how many match.

        Raises:
            ValueError: ``limit`` outside 1..MAX_PAGE or a negative ``offset``.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1..{MAX_PAGE}, got {limit}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        conditions = [
            column == value
            for column, value in (
                (Device.line, group),
                (Device.site, site),
                (Device.profile, profile),
                (Device.model, model),
                (Device.status, status),
            )
            if value is not None
        ]
        with self._read("listing devices") as session:
            total = session.scalar(select(func.count()).select_from(Device).where(*conditions))
            rows = list(
                session.scalars(
                    select(Device)
                    .where(*conditions)
                    .order_by(Device.id)
                    .limit(limit)
                    .offset(offset)
                )
            )
            alerts = vq.open_device_alert_counts(session, [r.id for r in rows])
        return [{**vq.device_row(r), "open_alerts": alerts.get(r.id, 0)} for r in rows], int(
            total or 0
        )

    def device(self, device_id: str, *, events: int = 50) -> dict[str, Any] | None:
        """One device's row with ``model_history`` (activations and rollbacks from its
        update events, newest first, each with the model id when the release is known)
        and its ``events`` (the newest ``events`` update events); None if unknown."""
        with self._read(f"reading device {device_id}") as session:
            row = session.get(Device, device_id)
            if row is None:
                return None
            recent = list(
                session.scalars(
                    select(UpdateEventRow)
                    .where(UpdateEventRow.device_id == device_id)
                    .order_by(UpdateEventRow.received_at.desc(), UpdateEventRow.id.desc())
                    .limit(events)
                )
            )
            history_rows = list(
                session.scalars(
                    select(UpdateEventRow)
                    .where(
                        UpdateEventRow.device_id == device_id,
                        UpdateEventRow.event.in_(_HISTORY_EVENTS),
                    )
                    .order_by(UpdateEventRow.received_at.desc(), UpdateEventRow.id.desc())
                    .limit(events)
                )
            )
            targets = {e.target for e in (*recent, *history_rows) if e.target}
            models = vq.models_of(session, targets)
        return {
            **vq.device_row(row),
            "model_history": [
                {
                    "event": e.event,
                    "target": e.target,
                    "model": models.get(e.target or ""),
                    "at": e.received_at,
                    "ts": e.ts,
                    "reason": e.reason,
                }
                for e in history_rows
            ],
            "events": [vq.event_row(e, models) for e in recent],
        }

    def device_windows(self, device_id: str, limit: int = 120) -> list[dict[str, Any]]:
        """The newest ``limit`` windows of a device, oldest first, as chart data
        (``window_summary.summarize_window``: t0, t1, frames, counts, rates, throughput,
        latency p50/p99, feature means, model).

        Raises:
            ValueError: ``limit`` outside 1..MAX_PAGE.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1..{MAX_PAGE}, got {limit}")
        with self._read(f"reading windows of {device_id}") as session:
            documents = list(
                session.scalars(
                    select(TelemetryWindowRow.window)
                    .where(TelemetryWindowRow.device_id == device_id)
                    .order_by(TelemetryWindowRow.seq.desc())
                    .limit(limit)
                )
            )
        return [ws.summarize_window(d) for d in reversed(documents)]

    def reference_band(
        self, device_id: str, frames: int | None = None
    ) -> dict[str, tuple[float, float]] | None:
        """Per feature, the reference mean -/+ 3 window-mean sigmas of the device's current
        model (for windows of ``frames`` frames; the profile's window size when None).
        None when the device, its model, or the model's reference is unknown."""
        reference = self._reference_of(device_id)
        if reference is None:
            return None
        return {
            name: ws.reference_band(feature, frames)
            for name, feature in reference.profile.features.items()
        }

    def reference_means(self, device_id: str) -> dict[str, float] | None:
        """Per feature, the reference mean of the device's current model (None: unknown)."""
        reference = self._reference_of(device_id)
        if reference is None:
            return None
        return {name: f.mean for name, f in reference.profile.features.items()}

    def alerts_for_device(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """Alerts (open and resolved, newest first) on the device itself or on a group
        whose drifting devices include it."""
        with self._read(f"reading alerts of {device_id}") as session:
            own = list(
                session.scalars(
                    select(AlertRow)
                    .where(AlertRow.scope == "device", AlertRow.scope_key == device_id)
                    .order_by(AlertRow.id.desc())
                    .limit(limit)
                )
            )
            groups = [
                row
                for row in session.scalars(
                    select(AlertRow)
                    .where(AlertRow.scope != "device")
                    .order_by(AlertRow.id.desc())
                    .limit(vq.GROUP_ALERT_SCAN)
                )
                if device_id in (row.devices or ())
            ]
        rows = sorted([*own, *groups], key=lambda r: r.id, reverse=True)[:limit]
        return [vq.alert_row(r) for r in rows]

    # -- drift ------------------------------------------------------------------------

    def heatmap(
        self,
        now: datetime,
        *,
        features: Sequence[str] | None = None,
        group: str | None = None,
        limit: int = HEATMAP_LIMIT,
    ) -> dict[str, Any]:
        """Devices x features: each device's latest window's standardized shift of every
        feature ((mean - reference mean) / window-mean sigma), None without a window or a
        reference; ``alerts`` lists the features with an open alert covering the device.

        Returns ``{"features": [...], "rows": [{"device", "group", "model", "t1",
        "age_s", "cells": {feature: shift | None}, "alerts": [feature, ...]}],
        "total": devices matching}``.

        Raises:
            ValueError: an unknown feature, or ``limit`` outside 1..MAX_PAGE.
        """
        names = tuple(features) if features is not None else ws.IMAGE_FEATURES
        unknown = [f for f in names if f not in FEATURE_NAMES]
        if unknown:
            raise ValueError(f"unknown features: {', '.join(unknown)}")
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1..{MAX_PAGE}, got {limit}")
        with self._read("reading the drift heatmap") as session:
            where = [] if group is None else [Device.line == group]
            total = session.scalar(select(func.count()).select_from(Device).where(*where))
            devices = list(
                session.execute(
                    select(Device.id, Device.line, Device.model)
                    .where(*where)
                    .order_by(Device.line, Device.id)
                    .limit(limit)
                )
            )
            latest = vq.latest_windows(session, [d[0] for d in devices])
            covered = vq.open_alert_features(session, {d[0]: (d[1], d[2]) for d in devices})
        rows = []
        for device_id, line, model in devices:
            document = latest.get(device_id)
            reference = self._reference(model)
            cells: dict[str, float | None] = dict.fromkeys(names)
            if document is not None and reference is not None:
                for name in names:
                    cells[name] = ws.standardized_shift(
                        document, name, reference.profile.features[name]
                    )
            t1 = None if document is None else document.get("t1")
            rows.append(
                {
                    "device": device_id,
                    "group": line,
                    "model": model,
                    "t1": t1,
                    "age_s": None if not isinstance(t1, int) else now.timestamp() - t1,
                    "cells": cells,
                    "alerts": sorted(covered.get(device_id, ())),
                }
            )
        return {"features": list(names), "rows": rows, "total": int(total or 0)}

    def groups(self) -> list[dict[str, Any]]:
        """Per group: devices, online, models (with device counts), and over each
        device's latest window pooled: frames, ``fail_rate`` and ``means`` per feature
        (exact pooled means from the moments); ``shift`` per feature in window-mean
        sigmas against the reference of the model most of those windows ran (empty
        when no reference is known)."""
        with self._read("comparing groups") as session:
            devices = list(
                session.execute(select(Device.id, Device.line, Device.model, Device.status))
            )
            latest = vq.latest_windows(session, [d[0] for d in devices])
        by_group: dict[str | None, list[tuple[str, str | None, str]]] = {}
        for device_id, line, model, status in devices:
            by_group.setdefault(line, []).append((device_id, model, status))
        out = []
        for group in sorted(by_group, key=lambda g: (g is None, g or "")):
            members = by_group[group]
            documents = [latest[d] for d, _, _ in members if d in latest]
            out.append(
                {
                    "group": group,
                    "devices": len(members),
                    "online": sum(1 for _, _, s in members if s == "online"),
                    "models": dict(Counter(m or "unknown" for _, m, _ in members).most_common()),
                    **self._pooled(documents),
                }
            )
        return out

    # -- helpers ----------------------------------------------------------------------

    def _pooled(self, documents: Sequence[dict[str, Any]]) -> dict[str, Any]:
        # Releases of one model line share a reference profile; with several lines the
        # one most windows ran is the yardstick (a comparison, not a drift test).
        models = Counter(m for d in documents if isinstance(m := d.get("model"), str))
        reference = next(
            (r for m, _ in models.most_common() if (r := self._reference(m)) is not None), None
        )
        return ws.pool_windows(documents, None if reference is None else reference.profile)

    def _reference_of(self, device_id: str) -> ModelReference | None:
        with self._read(f"reading device {device_id}") as session:
            model = session.scalar(select(Device.model).where(Device.id == device_id))
        return self._reference(model)

    def _reference(self, model: str | None) -> ModelReference | None:
        if model is None or self._references is None:
            return None
        return self._references.get(model)

    def _read(self, what: str) -> Transaction:
        return Transaction(self._sessions(), what)
