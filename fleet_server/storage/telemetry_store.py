"""Devices and telemetry windows in the database.

``TelemetryStore`` is thin: each method is one short transaction. A window is stored once
per (device, seq): a repeat is reported as a duplicate and changes nothing, whether the
check or the UNIQUE constraint catches it (two ingest replicas racing).

``add_windows`` stores a whole batch in one transaction: on SQLite and PostgreSQL one
``INSERT ... ON CONFLICT (device_id, seq) DO NOTHING ... RETURNING`` for the windows (so
a duplicate, even one another replica stored a moment ago, is skipped by the database
and counted exactly), devices created if missing, and each device's row updated once.
``windows_after`` reads windows in storage order (the drift feed tails the table).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Engine,
    Insert,
    Table,
    Text,
    bindparam,
    cast,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
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


@dataclass(frozen=True, slots=True)
class IncomingWindow:
    """A decoded window on its way into the database.

    ``document`` is the window as received (``decode_window`` accepted it), as its JSON
    object or as the JSON text itself (stored as is: no second parse), kept so that
    ``replay`` decodes exactly what arrived.
    """

    device_id: str
    window: TelemetryWindow
    document: dict[str, Any] | str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What ``add_windows`` did: the windows stored (in the order given) and how many
    were duplicates (their (device, seq) stored already, or repeated in the batch)."""

    stored: tuple[IncomingWindow, ...]
    duplicates: int


@dataclass(frozen=True, slots=True)
class TailedWindow:
    """A stored window with its row id (ids grow in storage order)."""

    id: int
    device_id: str
    window: TelemetryWindow
    received_at: datetime


# Dialects with INSERT ... ON CONFLICT DO NOTHING ... RETURNING (SQLite >= 3.35).
_IGNORING_DIALECTS = frozenset(("sqlite", "postgresql"))
_WINDOWS = typing.cast(Table, TelemetryWindowRow.__table__)
_DEVICES = typing.cast(Table, Device.__table__)
_JSON_TEXT = "window_json"


class TelemetryStore:
    """Devices and windows. Safe to use from several threads (a session per call).

    Raises (every method):
        StorageError: the database failed (the message says what was being done).
    """

    def __init__(self, engine: Engine) -> None:
        self._sessions = session_factory(engine)
        self._dialect = engine.dialect.name
        # The window's JSON text goes in as it came: a text parameter (PostgreSQL casts it
        # to the column's JSON type; SQLite keeps JSON as text anyway, and its CAST to an
        # unknown type name would turn the text into a number).
        text_param = bindparam(_JSON_TEXT, type_=Text)
        self._json_text: ColumnElement[Any] = (
            text_param
            if self._dialect != "postgresql"
            else cast(text_param, _WINDOWS.c.window.type)
        )

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
        return self._add_one(IncomingWindow(device_id, window, document, now))

    def add_windows(self, windows: Sequence[IncomingWindow]) -> BatchResult:
        """Store a batch of decoded windows in one transaction; duplicates are skipped.

        Devices seen for the first time get a row; each device with a stored window gets
        ``last_seen``, ``model`` and ``edge_version`` from its highest stored seq. On
        dialects without ``ON CONFLICT`` the windows are stored one by one.

        Raises:
            StorageError: the database failed; nothing of the batch is stored.
        """
        if self._dialect not in _IGNORING_DIALECTS:
            stored = [w for w in windows if self._add_one(w)]
            return BatchResult(tuple(stored), len(windows) - len(stored))
        unique: dict[tuple[str, int], IncomingWindow] = {}
        for w in windows:
            unique.setdefault((w.device_id, w.window.seq), w)
        if not unique:
            return BatchResult((), len(windows))
        table, devices = _WINDOWS, _DEVICES
        first_seen: dict[str, datetime] = {}
        for w in unique.values():
            first_seen.setdefault(w.device_id, w.received_at)
        with self._transaction(f"storing {len(unique)} windows") as session:
            # Sorted: concurrent replicas take row locks in one order (no deadlock).
            session.execute(
                _insert_ignoring(self._dialect, devices, ["id"]),
                [
                    {
                        "id": d,
                        "status": "unknown",
                        "drift": [],
                        "first_seen": t,
                        "last_seen": t,
                    }
                    for d, t in sorted(first_seen.items())
                ],
            )
            inserted = session.execute(
                _insert_ignoring(self._dialect, table, ["device_id", "seq"])
                .values(window=self._json_text)
                .returning(table.c.device_id, table.c.seq),
                [_window_values(w, text_key=_JSON_TEXT) for w in unique.values()],
            )
            keys = {(device_id, seq) for device_id, seq in inserted}
            stored = [w for key, w in unique.items() if key in keys]
            latest: dict[str, IncomingWindow] = {}
            for w in stored:
                seen = latest.get(w.device_id)
                if seen is None or w.window.seq > seen.window.seq:
                    latest[w.device_id] = w
            if latest:
                session.execute(
                    update(devices)
                    .where(devices.c.id == bindparam("b_id"))
                    .values(
                        last_seen=bindparam("b_seen"),
                        model=bindparam("b_model"),
                        edge_version=bindparam("b_edge"),
                    ),
                    [
                        {
                            "b_id": d,
                            "b_seen": w.received_at,
                            "b_model": w.window.model,
                            "b_edge": w.window.edge,
                        }
                        for d, w in sorted(latest.items())
                    ],
                    execution_options={"synchronize_session": False},
                )
        return BatchResult(tuple(stored), len(windows) - len(stored))

    def last_window_id(self) -> int:
        """The highest window row id (0 for none): where a drift feed starts tailing."""
        with self._transaction("reading the last window id") as session:
            return int(session.scalar(select(func.max(TelemetryWindowRow.id))) or 0)

    def windows_after(self, after_id: int, limit: int) -> tuple[list[TailedWindow], int]:
        """Up to ``limit`` windows with a row id above ``after_id``, in id order, and the
        highest id read (``after_id`` if none): where the next call starts.

        A row that no longer decodes (a schema change) is passed over.
        """
        with self._transaction("reading new windows") as session:
            rows = list(
                session.execute(
                    select(
                        TelemetryWindowRow.id,
                        TelemetryWindowRow.device_id,
                        TelemetryWindowRow.window,
                        TelemetryWindowRow.received_at,
                    )
                    .where(TelemetryWindowRow.id > after_id)
                    .order_by(TelemetryWindowRow.id)
                    .limit(limit)
                )
            )
        out = []
        for row_id, device_id, document, received_at in rows:
            try:
                window = decode_window(json.dumps(document).encode())
            except ValueError:
                continue
            out.append(TailedWindow(row_id, device_id, window, received_at))
        return out, (rows[-1][0] if rows else after_id)

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

    def _add_one(self, incoming: IncomingWindow) -> bool:
        device_id, window, now = incoming.device_id, incoming.window, incoming.received_at
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
                values = _window_values(incoming, text_key=None)
                session.add(TelemetryWindowRow(**values))
        except StorageError as e:
            if isinstance(e.__cause__, IntegrityError):
                return False
            raise
        return True

    def _transaction(self, what: str) -> Transaction:
        return Transaction(self._sessions(), what)


def _device(session: Session, device_id: str, now: datetime) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        device = Device(id=device_id, status="unknown", drift=[], first_seen=now, last_seen=now)
        session.add(device)
    return device


def _insert_ignoring(dialect: str, table: Table, keys: list[str]) -> Insert:
    """INSERT that skips rows whose ``keys`` are stored already (SQLite, PostgreSQL)."""
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=keys)
    return postgresql.insert(table).on_conflict_do_nothing(index_elements=keys)


def _window_values(incoming: IncomingWindow, *, text_key: str | None) -> dict[str, Any]:
    """A window's column values; the document as JSON text under ``text_key``, or as an
    object under ``window`` for None."""
    window, document = incoming.window, incoming.document
    values = {
        "device_id": incoming.device_id,
        "seq": window.seq,
        "model": window.model,
        "ref": window.ref,
        "t0": window.t0,
        "t1": window.t1,
        "frames": window.frames,
        "received_at": incoming.received_at,
    }
    if text_key is None:
        values["window"] = json.loads(document) if isinstance(document, str) else document
    else:
        values[text_key] = document if isinstance(document, str) else json.dumps(document)
    return values


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
