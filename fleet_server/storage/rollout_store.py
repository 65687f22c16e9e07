"""Rollouts, their waves and devices, and the devices' update events in the database.

``RolloutStore`` is thin: each method is one short transaction with no policy in it (the
service decides; ``fleet_server.domain.rollout`` holds the rules). The views
(``RolloutView`` and its waves and devices) are plain copies of the rows, JSON-able
through ``document()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from fleet_server.domain.rollout import (
    ACTIVE_STATES,
    Conflict,
    DeviceFacts,
    GateLimits,
    NotFound,
    RolloutSpec,
    Selection,
    transition,
)
from fleet_server.storage.audit import record_audit
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.rollout_views import (
    RolloutView,
    build_view,
    release_of,
    rollout_row,
    wave_rows,
)
from fleet_server.storage.schema import (
    Device,
    RolloutDeviceRow,
    RolloutRow,
    RolloutWaveRow,
)


@dataclass(frozen=True, slots=True)
class WaveRecord:
    number: int
    size: int
    state: str
    started_at: datetime | None
    finished_at: datetime | None
    gate_results: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """What the driver needs of a rollout to step it."""

    id: int
    state: str
    release_path: str
    model: str
    current_wave: int
    pause_s: float
    auto_rollback: bool
    gates: GateLimits
    waves: tuple[WaveRecord, ...]

    @property
    def wave(self) -> WaveRecord:
        return self.waves[self.current_wave]


class RolloutStore:
    """Rollouts, waves, rollout devices and update events. Each method is one
    transaction; changes made for an operator or the driver write their audit row in it.

    Raises (every method):
        StorageError: the database failed (the message says what was being done).
        NotFound: no rollout of that id (methods taking ``rollout_id``).
    """

    def __init__(self, engine: Engine) -> None:
        self._sessions = session_factory(engine)

    def _transaction(self, what: str) -> Transaction:
        return Transaction(self._sessions(), what)

    # -- reading ------------------------------------------------------------------------

    def device_facts(self) -> list[DeviceFacts]:
        """Every known device, for target selection."""
        query = select(
            Device.id, Device.line, Device.site, Device.profile, Device.model, Device.status
        )
        with self._transaction("listing devices for a rollout") as session:
            return [
                DeviceFacts(id_, line, site, profile, model, status == "online")
                for id_, line, site, profile, model, status in session.execute(query)
            ]

    def view(self, rollout_id: int) -> RolloutView:
        with self._transaction(f"reading rollout {rollout_id}") as session:
            return build_view(session, rollout_row(session, rollout_id))

    def views(self, *, active_only: bool = False) -> list[RolloutView]:
        """Newest first; ``active_only``: rollouts not finished (pending, running, paused,
        halted)."""
        query = select(RolloutRow).order_by(RolloutRow.id.desc())
        if active_only:
            query = query.where(RolloutRow.state.in_(ACTIVE_STATES))
        with self._transaction("listing rollouts") as session:
            return [build_view(session, row) for row in session.scalars(query)]

    def stepping(self) -> list[RolloutRecord]:
        """Rollouts the driver steps: running and paused ones (one indexed query when
        there are none)."""
        with self._transaction("reading active rollouts") as session:
            rows = list(
                session.scalars(
                    select(RolloutRow)
                    .where(RolloutRow.state.in_(("running", "paused")))
                    .order_by(RolloutRow.id)
                )
            )
            return [_record(session, row) for row in rows]

    def record(self, rollout_id: int) -> RolloutRecord:
        with self._transaction(f"reading rollout {rollout_id}") as session:
            return _record(session, rollout_row(session, rollout_id))

    def wave_devices(self, rollout_id: int, number: int) -> list[RolloutDeviceRecord]:
        """The devices of one wave, by id."""
        with self._transaction(f"reading wave {number} of rollout {rollout_id}") as session:
            rows = session.scalars(
                select(RolloutDeviceRow)
                .where(RolloutDeviceRow.rollout_id == rollout_id, RolloutDeviceRow.wave == number)
                .order_by(RolloutDeviceRow.device_id)
            )
            return [_device_record(row) for row in rows]

    def assigned_devices(self, rollout_id: int) -> list[RolloutDeviceRecord]:
        """Devices of the rollout that were assigned the release (whatever they did with
        it since)."""
        with self._transaction(f"reading devices of rollout {rollout_id}") as session:
            rows = session.scalars(
                select(RolloutDeviceRow)
                .where(
                    RolloutDeviceRow.rollout_id == rollout_id,
                    RolloutDeviceRow.assigned_at.is_not(None),
                )
                .order_by(RolloutDeviceRow.device_id)
            )
            return [_device_record(r) for r in rows]

    def busy_devices(self, device_ids: Sequence[str]) -> dict[str, int]:
        """device id -> the unfinished rollout (pending, running, paused, halted) it is
        targeted by, for the given ids."""
        busy: dict[str, int] = {}
        with self._transaction("checking devices in unfinished rollouts") as session:
            for start in range(0, len(device_ids), 500):
                chunk = list(device_ids[start : start + 500])
                query = (
                    select(RolloutDeviceRow.device_id, RolloutDeviceRow.rollout_id)
                    .join(RolloutRow, RolloutRow.id == RolloutDeviceRow.rollout_id)
                    .where(
                        RolloutDeviceRow.device_id.in_(chunk),
                        RolloutDeviceRow.wave.is_not(None),
                        RolloutRow.state.in_(ACTIVE_STATES),
                    )
                )
                for device_id, rollout_id in session.execute(query):
                    busy[device_id] = rollout_id
        return busy

    # -- changing -----------------------------------------------------------------------

    def create(
        self,
        *,
        release_id: int,
        spec: RolloutSpec,
        selection: Selection,
        sizes: Sequence[int],
        previous: Mapping[str, str | None],
        actor: str,
        now: datetime,
    ) -> int:
        """Insert a running rollout with its waves (all pending) and devices (targeted
        ones pending in wave order, skipped ones with their reasons); returns its id."""
        with self._transaction("creating a rollout") as session:
            row = RolloutRow(
                release_id=release_id,
                state="running",
                target=spec.target.document(),
                plan=[w.document() for w in spec.waves],
                gates=spec.gates.document(),
                pause_s=spec.pause_s,
                auto_rollback=spec.auto_rollback,
                current_wave=0,
                reason=None,
                created_by=actor,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            for number, size in enumerate(sizes):
                session.add(
                    RolloutWaveRow(
                        rollout_id=row.id,
                        number=number,
                        size=size,
                        state="pending",
                        gate_results={},
                    )
                )
            targeted = iter(selection.targeted)
            for number, size in enumerate(sizes):
                for _ in range(size):
                    device_id = next(targeted)
                    session.add(
                        RolloutDeviceRow(
                            rollout_id=row.id,
                            device_id=device_id,
                            wave=number,
                            status="pending",
                            previous_target=previous.get(device_id),
                        )
                    )
            for skip in selection.skipped:
                session.add(
                    RolloutDeviceRow(
                        rollout_id=row.id,
                        device_id=skip.device_id,
                        wave=None,
                        status="skipped",
                        reason=skip.reason[:400],
                    )
                )
            record_audit(
                session,
                actor,
                "rollout.create",
                f"rollout/{row.id}",
                {
                    "release_id": release_id,
                    "target": row.target,
                    "waves": list(sizes),
                    "skipped": len(selection.skipped),
                    "pause_s": spec.pause_s,
                    "auto_rollback": spec.auto_rollback,
                },
                now,
            )
            return row.id

    def change_state(
        self,
        rollout_id: int,
        action: str,
        *,
        actor: str,
        now: datetime,
        reason: str | None = None,
        expect: str | None = None,
    ) -> str:
        """Apply ``action`` (``domain.rollout.transition``) and return the new state. On
        abort, waves not finished become aborted. ``expect``: the state the caller saw;
        if another writer changed it meanwhile, Conflict.

        Raises:
            Conflict: the action is not allowed in the current state.
        """
        with self._transaction(f"{action} rollout {rollout_id}") as session:
            row = rollout_row(session, rollout_id, lock=True)
            if expect is not None and row.state != expect:
                raise Conflict(f"rollout {rollout_id} is {row.state} now, not {expect}")
            before = row.state
            row.state = transition(row.state, action)
            row.updated_at = now
            if reason is not None:
                row.reason = reason[:400]
            if action == "abort":
                for wave in wave_rows(session, rollout_id):
                    if wave.state in ("pending", "assigned", "observing"):
                        wave.state = "aborted"
                        wave.finished_at = wave.finished_at or now
            detail: dict[str, Any] = {"from": before, "to": row.state}
            if reason is not None:
                detail["reason"] = reason
            record_audit(session, actor, f"rollout.{action}", f"rollout/{rollout_id}", detail, now)
            return row.state

    def mark_assigned(
        self, rollout_id: int, number: int, device_ids: Sequence[str], *, actor: str, now: datetime
    ) -> None:
        """Wave ``number`` and its devices are assigned at ``now`` (the director has signed
        their assignments).

        Raises:
            Conflict: the wave is not pending or the rollout not running any more (another
                process stepped or stopped it meanwhile).
        """
        with self._transaction(f"assigning wave {number} of rollout {rollout_id}") as session:
            rollout = rollout_row(session, rollout_id, lock=True)
            wave = _wave(session, rollout_id, number)
            if wave.state != "pending" or rollout.state != "running":
                raise Conflict(
                    f"wave {number} of rollout {rollout_id} is {wave.state} and the rollout "
                    f"{rollout.state}: not assigned again"
                )
            wave.state = "assigned"
            wave.started_at = now
            for row in session.scalars(
                select(RolloutDeviceRow).where(
                    RolloutDeviceRow.rollout_id == rollout_id,
                    RolloutDeviceRow.device_id.in_(device_ids),
                    RolloutDeviceRow.status == "pending",
                )
            ):
                row.status = "assigned"
                row.assigned_at = now
            rollout.updated_at = now
            record_audit(
                session,
                actor,
                "rollout.assign_wave",
                f"rollout/{rollout_id}",
                {"wave": number, "devices": len(device_ids)},
                now,
            )

    def save_judgement(
        self,
        rollout_id: int,
        number: int,
        wave_state: str,
        gate_results: dict[str, dict[str, Any]],
        *,
        now: datetime,
    ) -> None:
        """Store a wave's gate figures and state (``passed``/``failed`` also set its end).

        Raises:
            Conflict: the wave is no longer being judged (assigned or observing).
        """
        with self._transaction(f"judging wave {number} of rollout {rollout_id}") as session:
            rollout_row(session, rollout_id, lock=True)
            wave = _wave(session, rollout_id, number)
            if wave.state not in ("assigned", "observing"):
                raise Conflict(f"wave {number} of rollout {rollout_id} is {wave.state} already")
            wave.gate_results = gate_results
            if wave_state != wave.state:
                wave.state = wave_state
                if wave_state in ("passed", "failed"):
                    wave.finished_at = now

    def advance(self, rollout_id: int, passed: int, *, actor: str, now: datetime) -> int:
        """Move on from wave ``passed`` to the next one (pending until its pause is over);
        returns its number.

        Raises:
            Conflict: the rollout is not at wave ``passed`` any more.
        """
        with self._transaction(f"advancing rollout {rollout_id}") as session:
            row = rollout_row(session, rollout_id, lock=True)
            if row.current_wave != passed:
                raise Conflict(f"rollout {rollout_id} is at wave {row.current_wave} already")
            row.current_wave += 1
            row.updated_at = now
            record_audit(
                session,
                actor,
                "rollout.next_wave",
                f"rollout/{rollout_id}",
                {"wave": row.current_wave},
                now,
            )
            return row.current_wave

    def mark_rolled_back(
        self,
        rollout_id: int,
        reassigned: Mapping[str, str],
        kept: Mapping[str, str],
        *,
        reason: str,
        actor: str,
        now: datetime,
    ) -> None:
        """The rollout is rolled back: ``reassigned`` devices (id -> previous target) are
        rolled_back, ``kept`` ones (id -> why not) keep their status with that reason;
        waves that were assigned become rolled_back, pending ones aborted.

        Raises:
            Conflict: the rollout's state does not allow a rollback.
        """
        with self._transaction(f"rolling back rollout {rollout_id}") as session:
            row = rollout_row(session, rollout_id, lock=True)
            before = row.state
            row.state = transition(row.state, "rollback")
            row.reason = reason[:400]
            row.updated_at = now
            for wave in wave_rows(session, rollout_id):
                if wave.state == "pending":
                    wave.state = "aborted"
                elif wave.state != "aborted":
                    wave.state = "rolled_back"
                wave.finished_at = wave.finished_at or now
            devices = session.scalars(
                select(RolloutDeviceRow).where(
                    RolloutDeviceRow.rollout_id == rollout_id,
                    RolloutDeviceRow.device_id.in_([*reassigned, *kept]),
                )
            )
            for device in devices:
                if device.device_id in reassigned:
                    device.status = "rolled_back"
                    device.reason = f"rolled back to {reassigned[device.device_id]}"[:400]
                else:
                    device.reason = kept[device.device_id][:400]
            record_audit(
                session,
                actor,
                "rollout.rollback",
                f"rollout/{rollout_id}",
                {
                    "from": before,
                    "reason": reason,
                    "reassigned": len(reassigned),
                    "not_rolled_back": dict(sorted(kept.items())[:20]),
                },
                now,
            )


@dataclass(frozen=True, slots=True)
class RolloutDeviceRecord:
    device_id: str
    wave: int | None
    status: str
    reason: str | None
    previous_target: str | None
    assigned_at: datetime | None
    activated_at: datetime | None


def _device_record(row: RolloutDeviceRow) -> RolloutDeviceRecord:
    return RolloutDeviceRecord(
        row.device_id,
        row.wave,
        row.status,
        row.reason,
        row.previous_target,
        row.assigned_at,
        row.activated_at,
    )


def _wave(session: Session, rollout_id: int, number: int) -> RolloutWaveRow:
    wave = session.scalar(
        select(RolloutWaveRow).where(
            RolloutWaveRow.rollout_id == rollout_id, RolloutWaveRow.number == number
        )
    )
    if wave is None:
        raise NotFound(f"rollout {rollout_id} has no wave {number}")
    return wave


def _record(session: Session, row: RolloutRow) -> RolloutRecord:
    release = release_of(session, row)
    return RolloutRecord(
        id=row.id,
        state=row.state,
        release_path=release.target_path,
        model=f"{release.name}@{release.version}",
        current_wave=row.current_wave,
        pause_s=row.pause_s,
        auto_rollback=row.auto_rollback,
        gates=GateLimits.from_document(row.gates),
        waves=tuple(
            WaveRecord(w.number, w.size, w.state, w.started_at, w.finished_at, dict(w.gate_results))
            for w in wave_rows(session, row.id)
        ),
    )
