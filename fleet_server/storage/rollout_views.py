"""Read-only views of rollouts, their waves and devices: plain copies of the rows, with
``document()`` giving JSON-able dicts (times in ISO 8601) for the API and the console;
``build_view`` makes one from a rollout row, and the small row lookups it needs are
shared with ``rollout_store``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.domain.rollout import NotFound
from fleet_server.storage.schema import ReleaseRow, RolloutDeviceRow, RolloutRow, RolloutWaveRow


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass(frozen=True)
class WaveView:
    """One wave: ``gate_results`` maps a gate name to ``{"value", "limit", "passed",
    "detail"}``; ``counts`` maps a device status to how many of the wave's devices have it."""

    number: int
    size: int
    state: str
    gate_results: dict[str, dict[str, Any]]
    started_at: datetime | None
    finished_at: datetime | None
    counts: dict[str, int]

    def document(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "size": self.size,
            "state": self.state,
            "gate_results": self.gate_results,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "counts": self.counts,
        }


@dataclass(frozen=True)
class RolloutDeviceView:
    """A targeted (``wave`` set) or skipped (``wave`` None) device of a rollout."""

    device_id: str
    wave: int | None
    status: str
    reason: str | None
    assigned_at: datetime | None
    activated_at: datetime | None

    def document(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "wave": self.wave,
            "status": self.status,
            "reason": self.reason,
            "assigned_at": _iso(self.assigned_at),
            "activated_at": _iso(self.activated_at),
        }


@dataclass(frozen=True)
class RolloutView:
    """A rollout with its waves and devices. ``release`` is the target path, ``model``
    its ``name@version``."""

    id: int
    release: str
    model: str
    state: str
    target: dict[str, Any]
    plan: list[dict[str, Any]]
    gates: dict[str, Any]
    pause_s: float
    auto_rollback: bool
    current_wave: int
    reason: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    waves: tuple[WaveView, ...]
    devices: tuple[RolloutDeviceView, ...]

    def document(self) -> dict[str, Any]:
        """JSON-able, times in ISO 8601."""
        return {
            "id": self.id,
            "release": self.release,
            "model": self.model,
            "state": self.state,
            "target": self.target,
            "plan": self.plan,
            "gates": self.gates,
            "pause_s": self.pause_s,
            "auto_rollback": self.auto_rollback,
            "current_wave": self.current_wave,
            "reason": self.reason,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "waves": [w.document() for w in self.waves],
            "devices": [d.document() for d in self.devices],
        }


def rollout_row(session: Session, rollout_id: int, *, lock: bool = False) -> RolloutRow:
    """The rollout's row; ``lock``: for update (PostgreSQL serializes the writers of one
    rollout on it; SQLite has one writer anyway).

    Raises:
        NotFound: no such rollout.
    """
    row = session.get(RolloutRow, rollout_id, with_for_update=lock)
    if row is None:
        raise NotFound(f"no rollout {rollout_id}")
    return row


def wave_rows(session: Session, rollout_id: int) -> list[RolloutWaveRow]:
    return list(
        session.scalars(
            select(RolloutWaveRow)
            .where(RolloutWaveRow.rollout_id == rollout_id)
            .order_by(RolloutWaveRow.number)
        )
    )


def release_of(session: Session, row: RolloutRow) -> ReleaseRow:
    release = session.get(ReleaseRow, row.release_id)
    if release is None:  # the foreign key makes this a broken database
        raise NotFound(f"rollout {row.id} refers to missing release {row.release_id}")
    return release


def build_view(session: Session, row: RolloutRow) -> RolloutView:
    release = release_of(session, row)
    devices = list(
        session.scalars(
            select(RolloutDeviceRow)
            .where(RolloutDeviceRow.rollout_id == row.id)
            .order_by(
                RolloutDeviceRow.wave.is_(None), RolloutDeviceRow.wave, RolloutDeviceRow.device_id
            )
        )
    )
    counts: dict[int, Counter[str]] = {}
    for device in devices:
        if device.wave is not None:
            counts.setdefault(device.wave, Counter())[device.status] += 1
    return RolloutView(
        id=row.id,
        release=release.target_path,
        model=f"{release.name}@{release.version}",
        state=row.state,
        target=dict(row.target),
        plan=[dict(p) for p in row.plan],
        gates=dict(row.gates),
        pause_s=row.pause_s,
        auto_rollback=row.auto_rollback,
        current_wave=row.current_wave,
        reason=row.reason,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
        waves=tuple(
            WaveView(
                number=w.number,
                size=w.size,
                state=w.state,
                gate_results=dict(w.gate_results),
                started_at=w.started_at,
                finished_at=w.finished_at,
                counts=dict(sorted(counts.get(w.number, Counter()).items())),
            )
            for w in wave_rows(session, row.id)
        ),
        devices=tuple(
            RolloutDeviceView(
                d.device_id, d.wave, d.status, d.reason, d.assigned_at, d.activated_at
            )
            for d in devices
        ),
    )
