"""Devices and telemetry windows in the database.

``TelemetryStore`` is thin: each method is one short transaction. A window is stored once
per (device, seq): a repeat is reported as a duplicate and changes nothing, whether the
check or the UNIQUE constraint catches it (two ingest replicas racing).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edge_agent.protocol.state import DeviceState
from edge_agent.protocol.telemetry import TelemetryWindow, decode_window
from fleet_server.storage.database import StorageError, Transaction, session_factory
from fleet_server.storage.schema import Device, TelemetryWindowRow


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A device as last reported (a plain copy of its row)."""

    id: str
    line: str | None
    profile: str | None
    model: str | None
    edge_version: str | None
    status: str
    drift: tuple[str, ...]
    last_seen: datetime


@dataclass(frozen=True, slots=True)
class StoredWindow:
    device_id: str
    window: TelemetryWindow
    received_at: datetime


class TelemetryStore:
    """Devices and windows. Safe to use from several threads (a session per call).

    Raises (every method):
        StorageError: the database failed (the message says what was being done).
    """

    def __init__(self, engine: Engine) -> None:
        self._sessions = session_factory(engine)

    def record_state(self, device_id: str, state: DeviceState, now: datetime) -> None:
        """Update a device's row from its state message (fields the message omits keep
        their stored values; the status always changes)."""
        with self._transaction(f"storing the state of {device_id}") as session:
            device = _device(session, device_id, now)
            device.status = state.status.value
            device.last_seen = now
            if state.ts is not None:
                device.state_ts = state.ts
            if state.model is not None:
                if device.model is not None and device.model != state.model:
                    device.previous_model = device.model
                device.model = state.model
            if state.edge is not None:
                device.edge_version = state.edge
            if state.profile is not None:
                device.profile = state.profile
            if state.line is not None:
                device.line = state.line
            device.drift = list(state.drift)
            if state.spool_queued is not None:
                device.spool_queued = state.spool_queued
                device.spool_dropped = state.spool_dropped

    def add_window(
        self, device_id: str, window: TelemetryWindow, document: dict[str, Any], now: datetime
    ) -> bool:
        """Store a decoded window; False (nothing changed) if (device, seq) is stored.

        ``document`` is the window's JSON object as received (``decode_window`` accepted
        it), kept so that ``replay`` decodes exactly what arrived.
        """
        row = TelemetryWindowRow(
            device_id=device_id,
            seq=window.seq,
            model=window.model,
            ref=window.ref,
            t0=window.t0,
            t1=window.t1,
            frames=window.frames,
            window=document,
            received_at=now,
        )
        try:
            with self._transaction(f"storing window {window.seq} of {device_id}") as session:
                seen = session.scalar(
                    select(TelemetryWindowRow.id).where(
                        TelemetryWindowRow.device_id == device_id,
                        TelemetryWindowRow.seq == window.seq,
                    )
                )
                if seen is not None:
                    return False
                device = _device(session, device_id, now)
                device.last_seen = now
                device.model = window.model
                device.edge_version = window.edge
                session.add(row)
        except StorageError as e:
            if isinstance(e.__cause__, IntegrityError):
                return False
            raise
        return True

    def device(self, device_id: str) -> DeviceInfo | None:
        with self._transaction(f"reading device {device_id}") as session:
            row = session.get(Device, device_id)
            return None if row is None else _info(row)

    def devices(self) -> list[DeviceInfo]:
        with self._transaction("listing devices") as session:
            return [_info(row) for row in session.scalars(select(Device).order_by(Device.id))]

    def count_windows(self, device_id: str | None = None) -> int:
        with self._transaction("counting windows") as session:
            query = select(func.count(TelemetryWindowRow.id))
            if device_id is not None:
                query = query.where(TelemetryWindowRow.device_id == device_id)
            return int(session.scalar(query) or 0)

    def replay(self, per_device: int) -> Iterator[StoredWindow]:
        """The last ``per_device`` windows of every device, per device in seq order.

        Rows that no longer decode (a schema change) are skipped: the caller rebuilds
        detectors from what it can read.
        """
        with self._transaction("reading stored windows") as session:
            device_ids = list(session.scalars(select(Device.id).order_by(Device.id)))
        for device_id in device_ids:
            with self._transaction(f"reading windows of {device_id}") as session:
                rows = list(
                    session.execute(
                        select(TelemetryWindowRow.window, TelemetryWindowRow.received_at)
                        .where(TelemetryWindowRow.device_id == device_id)
                        .order_by(TelemetryWindowRow.seq.desc())
                        .limit(per_device)
                    )
                )
            for document, received_at in reversed(rows):
                try:
                    window = decode_window(json.dumps(document).encode())
                except ValueError:
                    continue
                yield StoredWindow(device_id, window, received_at)

    def _transaction(self, what: str) -> Transaction:
        return Transaction(self._sessions(), what)


def _device(session: Session, device_id: str, now: datetime) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        device = Device(id=device_id, status="unknown", drift=[], first_seen=now, last_seen=now)
        session.add(device)
    return device


def _info(row: Device) -> DeviceInfo:
    return DeviceInfo(
        id=row.id,
        line=row.line,
        profile=row.profile,
        model=row.model,
        edge_version=row.edge_version,
        status=row.status,
        drift=tuple(row.drift or ()),
        last_seen=row.last_seen,
    )
