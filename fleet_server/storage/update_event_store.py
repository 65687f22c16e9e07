"""The devices' update events (``devices/{id}/events``) in the database, and what they
do to the devices' rollout status."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select

from edge_agent.protocol.events import EventKind, UpdateEvent
from fleet_server.domain.rollout import ACTIVE_STATES
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import ReleaseRow, RolloutDeviceRow, RolloutRow, UpdateEventRow


class UpdateEventStore:
    """Stores update events. Safe to use from several threads (a session per call).

    Raises (every method):
        StorageError: the database failed.
    """

    def __init__(self, engine: Engine) -> None:
        self._sessions = session_factory(engine)

    def _transaction(self, what: str) -> Transaction:
        return Transaction(self._sessions(), what)

    def record_event(self, device_id: str, event: UpdateEvent, now: datetime) -> None:
        """Store one update event (see ``record_events``)."""
        self.record_events([ReceivedEvent(device_id, event, now)])

    def record_events(self, received: Sequence[ReceivedEvent]) -> None:
        """Store update events, in order, in one transaction, and move each device's
        status in the unfinished rollouts it was assigned in.

        A device's row follows the events for the rollout's release (an event without a
        target counts for a device still updating): ``activated`` -> activated;
        ``gate_failed`` or ``refused`` -> failed; ``rolled_back`` -> rolled_back (on the
        device); a retryable ``failed`` keeps it assigned, with the reason. Progress
        events change nothing. Rows the server rolled back are left alone.
        """
        if not received:
            return
        with self._transaction(f"storing {len(received)} update event(s)") as session:
            session.add_all(_row(r) for r in received)
            moving = [r for r in received if r.event.event in _STATUS_EVENTS]
            if not moving:
                return
            rows: dict[str, list[tuple[RolloutDeviceRow, str]]] = {}
            ids = sorted({r.device_id for r in moving})
            for start in range(0, len(ids), _CHUNK):
                query = (
                    select(RolloutDeviceRow, ReleaseRow.target_path)
                    .join(RolloutRow, RolloutRow.id == RolloutDeviceRow.rollout_id)
                    .join(ReleaseRow, ReleaseRow.id == RolloutRow.release_id)
                    .where(
                        RolloutDeviceRow.device_id.in_(ids[start : start + _CHUNK]),
                        RolloutDeviceRow.status.in_(("assigned", "activated", "failed")),
                        RolloutRow.state.in_(ACTIVE_STATES),
                    )
                )
                for row, release_path in session.execute(query):
                    rows.setdefault(row.device_id, []).append((row, release_path))
            for r in moving:
                for row, release_path in rows.get(r.device_id, ()):
                    if row.status not in ("assigned", "activated", "failed"):
                        continue  # an earlier event of this batch finished it
                    if r.event.target is None and row.status != "assigned":
                        continue
                    if r.event.target is not None and r.event.target != release_path:
                        continue
                    _apply_event(row, r.event, r.received_at)


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """An update event as the server received it."""

    device_id: str
    event: UpdateEvent
    received_at: datetime


# Keeps every IN (...) list far below the bound-parameter limits of SQLite and psycopg.
_CHUNK = 500


def _row(received: ReceivedEvent) -> UpdateEventRow:
    event = received.event
    return UpdateEventRow(
        device_id=received.device_id,
        event=event.event.value,
        ts=event.ts,
        target=None if event.target is None else event.target[:200],
        sha256=event.sha256,
        percent=event.percent,
        reason=None if event.reason is None else event.reason[:64],
        detail=None if event.detail is None else event.detail[:400],
        figures=dict(event.figures),
        received_at=received.received_at,
    )


_STATUS_EVENTS = frozenset(
    {
        EventKind.ACTIVATED,
        EventKind.GATE_FAILED,
        EventKind.REFUSED,
        EventKind.ROLLED_BACK,
        EventKind.FAILED,
    }
)


def _apply_event(row: RolloutDeviceRow, event: UpdateEvent, now: datetime) -> None:
    said = ": ".join(part for part in (event.reason, event.detail) if part)
    if event.event is EventKind.ACTIVATED:
        if row.status != "activated":  # a repeated (QoS 1) event keeps the first time
            row.activated_at = now
        row.status = "activated"
        row.reason = None
    elif event.event in (EventKind.GATE_FAILED, EventKind.REFUSED):
        row.status = "failed"
        row.reason = f"{event.event.value}: {said}"[:400]
    elif event.event is EventKind.ROLLED_BACK:
        row.status = "rolled_back"
        row.reason = f"rolled back on the device: {said}"[:400]
    elif row.status == "assigned":  # a retryable failure: the device tries again
        row.reason = f"retrying after failed: {said}"[:400]
