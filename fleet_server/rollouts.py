"""The fleet server's model registry and staged rollouts: one facade for the API, the
console, the CLI and the rollout driver.

``Registry`` mirrors the signed release role into the ``releases`` table.
``RolloutService`` creates rollouts, steps them (``tick``), takes the devices' update
events, and carries out the operators' pause, resume, abort and roll back. Policy (wave
plans, target selection, gates, the state machine) lives in ``fleet_server.domain``;
storage in ``fleet_server.storage``. Every change writes its audit row in the same
transaction; all state is in the database, so a restarted server continues a rollout.

Life of a rollout: created ``running`` with every wave ``pending``. Each ``tick``: a
pending wave is assigned (the director signs ``assignments/<device>`` for its devices in
one signing) when the previous wave passed ``pause_s`` ago; an assigned wave is judged
(``domain.rollout_gates.judge_wave``): it waits, passes (the next wave follows, or the
rollout completes) or fails (the rollout halts and, with ``auto_rollback``, is rolled
back). A paused rollout's current wave is still judged, so a failing canary still halts
it, but no new wave starts until it is resumed.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final

from sqlalchemy import Engine

from edge_agent.config import FirmwareProfile, profile_search_path
from edge_agent.protocol.events import UpdateEvent
from fleet_server.compatibility import find_profiles
from fleet_server.domain.rollout import (
    Conflict,
    GateLimits,
    NotFound,
    ReleaseFacts,
    RolloutError,
    RolloutSpec,
    RolloutTarget,
    Selection,
    WaveSpec,
    plan_waves,
    select_targets,
    transition,
)
from fleet_server.domain.rollout_gates import judge_wave
from fleet_server.repository import FleetRepository, RepositoryError
from fleet_server.repository.layout import release_path
from fleet_server.storage.registry_store import Registry, ReleaseView
from fleet_server.storage.rollout_store import RolloutRecord, RolloutStore
from fleet_server.storage.rollout_views import RolloutDeviceView, RolloutView, WaveView
from fleet_server.storage.update_event_store import ReceivedEvent, UpdateEventStore
from fleet_server.storage.wave_health import WaveHealthReader, WaveKey

__all__ = [
    "Conflict",
    "GateLimits",
    "NotFound",
    "Preview",
    "ReceivedEvent",
    "Registry",
    "ReleaseView",
    "RolloutDeviceView",
    "RolloutError",
    "RolloutService",
    "RolloutTarget",
    "RolloutView",
    "WaveSpec",
    "WaveView",
]

# The actor of the changes the driver makes by itself (audit log).
DRIVER_ACTOR: Final = "rollout-driver"
# Steps one tick may take per rollout (judge, advance, assign the next wave at pause 0).
_MAX_STEPS: Final = 4


@dataclass(frozen=True)
class Preview:
    """What a rollout would do: ``targeted`` device ids in wave order, ``skipped``
    ``(device_id, reason)`` pairs."""

    release: str
    model: str
    targeted: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]

    def document(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "model": self.model,
            "targeted": list(self.targeted),
            "skipped": [{"device_id": d, "reason": r} for d, r in self.skipped],
        }


class RolloutService:
    """Rollouts over ``engine``, assignments signed in ``repository``.

    Args:
        engine: the fleet database.
        repository: the signed repository; None makes the service read-only (creating
            and rolling back raise Conflict).
        profiles: firmware profiles by name, for fitting releases to devices (default:
            every profile on the agent's profile search path).

    Raises (every method):
        RolloutError: bad input, naming the field; NotFound, Conflict as documented.
        StorageError: the database failed.
        RepositoryError: signing assignments failed (nothing recorded as assigned).
    """

    def __init__(
        self,
        engine: Engine,
        repository: FleetRepository | None,
        *,
        profiles: Mapping[str, FirmwareProfile] | None = None,
    ) -> None:
        self._repository = repository
        self._store = RolloutStore(engine)
        self._events = UpdateEventStore(engine)
        self._registry = Registry(engine)
        self._health = WaveHealthReader(engine)
        self._profiles = (
            dict(profiles) if profiles is not None else find_profiles(profile_search_path())
        )
        # Operator actions and the driver's steps of one process never interleave.
        self._lock = threading.RLock()

    # -- reading ------------------------------------------------------------------------

    def preview(self, release: str, target: RolloutTarget) -> Preview:
        """The devices ``target`` selects for ``release`` (id, target path or
        name@version), in wave order, and the skipped ones with their reasons.

        Raises:
            NotFound: no such release in the registry.
        """
        view = self._registry.release(release)
        selection = self._select(view, target)
        return Preview(
            view.target_path,
            view.model,
            selection.targeted,
            tuple((s.device_id, s.reason) for s in selection.skipped),
        )

    def get(self, rollout_id: int) -> RolloutView:
        """Raises NotFound: no such rollout."""
        return self._store.view(rollout_id)

    def list(self, *, active_only: bool = False) -> builtins.list[RolloutView]:
        """Newest first; ``active_only``: pending, running, paused and halted ones."""
        return self._store.views(active_only=active_only)

    # -- operator actions ---------------------------------------------------------------

    def create(
        self,
        release: str,
        target: RolloutTarget,
        waves: Sequence[WaveSpec],
        gates: GateLimits,
        *,
        pause_s: float,
        auto_rollback: bool,
        actor: str,
        now: datetime,
    ) -> RolloutView:
        """Start a rollout of ``release`` (id, target path or name@version) in state
        ``running``; the next ``tick`` assigns its first wave.

        Raises:
            RolloutError: an invalid plan (no waves, the last wave short of 100 %) or
                pause.
            NotFound: no such release (after mirroring the release role once more).
            Conflict: read-only service; no device to roll out to; a selected device is
                in another unfinished rollout.
        """
        spec = RolloutSpec(target, tuple(waves), gates, pause_s, auto_rollback)
        repository = self._writable()
        with self._lock:
            try:
                view = self._registry.release(release)
            except NotFound:
                self._registry.sync(repository, now=now)
                view = self._registry.release(release)
            selection = self._select(view, target)
            sizes = plan_waves(len(selection.targeted), spec.waves)
            busy = self._store.busy_devices(selection.targeted)
            if busy:
                device, other = sorted(busy.items())[0]
                raise Conflict(
                    f"{len(busy)} selected device(s) are in unfinished rollouts (e.g. {device} "
                    f"in rollout {other}); finish, abort or roll those back first"
                )
            models = {d.id: d.model for d in self._store.device_facts()}
            previous = {d: _target_of(models.get(d)) for d in selection.targeted}
            rollout_id = self._store.create(
                release_id=view.id,
                spec=spec,
                selection=selection,
                sizes=sizes,
                previous=previous,
                actor=actor,
                now=now,
            )
            return self._store.view(rollout_id)

    def pause(self, rollout_id: int, *, actor: str, now: datetime) -> RolloutView:
        """Hold the rollout: no further wave starts (the current one is still judged).

        Raises:
            NotFound: no such rollout. Conflict: not pending or running.
        """
        return self._change(rollout_id, "pause", actor, now)

    def resume(self, rollout_id: int, *, actor: str, now: datetime) -> RolloutView:
        """Continue a paused rollout. Raises NotFound; Conflict: not paused."""
        return self._change(rollout_id, "resume", actor, now)

    def abort(self, rollout_id: int, *, actor: str, now: datetime) -> RolloutView:
        """Stop the rollout for good: no further wave; devices keep what they run and
        their assignments (roll back to undo).

        Raises:
            NotFound: no such rollout. Conflict: already finished.
        """
        return self._change(rollout_id, "abort", actor, now)

    def rollback(self, rollout_id: int, *, actor: str, now: datetime) -> RolloutView:
        """Assign every device the rollout assigned its previous target again (one
        director signing), and end the rollout as rolled_back.

        Devices that ran no model before, whose previous model is not a released target,
        or whose assignment has changed since (a later rollout), are not rolled back: they
        keep their status, with that reason.

        Raises:
            NotFound: no such rollout.
            Conflict: read-only service, already rolled back, or no device was assigned
                yet (abort it instead).
        """
        with self._lock:
            return self._rollback(rollout_id, actor, now, reason=f"rolled back by {actor}")

    def record_event(self, device_id: str, event: UpdateEvent, now: datetime) -> None:
        """Store a device's update event and move its status in its unfinished rollouts
        (see ``UpdateEventStore.record_events``)."""
        self._events.record_event(device_id, event, now)

    def record_events(self, received: Sequence[ReceivedEvent]) -> None:
        """``record_event`` for many events, in order, in one transaction."""
        self._events.record_events(received)

    # -- the driver ---------------------------------------------------------------------

    def tick(self, now: datetime) -> builtins.list[str]:
        """Step every running or paused rollout (rules in the module doc); returns one
        line per thing done. Idempotent: a tick with nothing due changes nothing, and a
        step cut short by a crash is redone by the next tick (re-signing an assignment
        that was already signed is harmless). A signing failure is reported as a line and
        retried at the next tick, as is a rollout another process changed meanwhile;
        other rollouts still step.
        """
        lines: builtins.list[str] = []
        with self._lock:
            for record in self._store.stepping():
                try:
                    lines += self._step(record, now)
                except RepositoryError as e:
                    lines.append(f"rollout {record.id}: cannot sign assignments: {e}")
                except Conflict as e:  # another process changed it meanwhile
                    lines.append(f"rollout {record.id}: not stepped: {e}")
        return lines

    # -- internals ----------------------------------------------------------------------

    def _writable(self) -> FleetRepository:
        if self._repository is None:
            raise Conflict("this server has no signing repository: rollouts are read-only")
        return self._repository

    def _select(self, view: ReleaseView, target: RolloutTarget) -> Selection:
        facts = ReleaseFacts(view.target_path, view.model, view.runtime, view.profiles)
        return select_targets(facts, target, self._store.device_facts(), self._profiles)

    def _change(self, rollout_id: int, action: str, actor: str, now: datetime) -> RolloutView:
        with self._lock:
            self._store.change_state(rollout_id, action, actor=actor, now=now)
            return self._store.view(rollout_id)

    def _rollback(self, rollout_id: int, actor: str, now: datetime, *, reason: str) -> RolloutView:
        record = self._store.record(rollout_id)
        transition(record.state, "rollback")  # Conflict before any signing
        repository = self._writable()
        devices = self._store.assigned_devices(rollout_id)
        if not devices:
            raise Conflict(f"rollout {rollout_id} has assigned no device yet: abort it instead")
        reassign: dict[str, str] = {}
        kept: dict[str, str] = {}
        current = repository.assignments()
        for device in devices:
            previous = device.previous_target
            now_assigned = current.get(device.device_id)
            if now_assigned != record.release_path:
                # A later rollout (or an operator) moved it on: do not undo that.
                kept[device.device_id] = f"not rolled back: it is assigned {now_assigned} now"
            elif previous is None:
                kept[device.device_id] = "not rolled back: it ran no model before the rollout"
            elif repository.released(previous) is None:
                kept[device.device_id] = (
                    f"not rolled back: its previous model {previous} is not a released target"
                )
            else:
                reassign[device.device_id] = previous
        repository.assign_many(reassign, now=now)
        self._store.mark_rolled_back(
            rollout_id, reassign, kept, reason=reason, actor=actor, now=now
        )
        for wave in record.waves:
            self._health.forget(_key(record, wave.number))
        return self._store.view(rollout_id)

    def _step(self, record: RolloutRecord, now: datetime) -> builtins.list[str]:
        lines: builtins.list[str] = []
        for _ in range(_MAX_STEPS):
            done = self._step_once(record, now)
            if done is None:
                break
            lines.append(f"rollout {record.id}: {done}")
            if record.state not in ("running", "paused"):
                break
            record = self._store.record(record.id)
            if record.state not in ("running", "paused"):
                break
        return lines

    def _step_once(self, record: RolloutRecord, now: datetime) -> str | None:
        """One change to ``record`` if one is due, described; None when nothing is."""
        wave = record.wave
        number = wave.number
        if wave.state == "pending":
            if record.state != "running":
                return None
            if number > 0:
                finished = record.waves[number - 1].finished_at
                if finished is None or (now - finished).total_seconds() < record.pause_s:
                    return None
            repository = self._writable()
            ids = [
                d.device_id
                for d in self._store.wave_devices(record.id, number)
                if d.status == "pending"
            ]
            repository.assign_many(dict.fromkeys(ids, record.release_path), now=now)
            self._store.mark_assigned(record.id, number, ids, actor=DRIVER_ACTOR, now=now)
            return f"wave {number} assigned {record.model} to {len(ids)} device(s)"
        if wave.state in ("assigned", "observing"):
            return self._judge(record, now)
        if wave.state == "passed" and record.state == "running":
            if number + 1 == len(record.waves):
                self._store.change_state(
                    record.id, "complete", actor=DRIVER_ACTOR, now=now, expect="running"
                )
                return f"completed: every wave of {record.model} passed its gates"
            self._store.advance(record.id, number, actor=DRIVER_ACTOR, now=now)
            return f"wave {number} passed; wave {number + 1} follows after {record.pause_s:g} s"
        return None

    def _judge(self, record: RolloutRecord, now: datetime) -> str | None:
        wave = record.wave
        if wave.started_at is None:  # assigned rows always have it; a broken row waits
            return None
        key = _key(record, wave.number)
        limits = record.gates
        judgement = judge_wave(
            limits, self._health.statuses(key), started_at=wave.started_at, now=now
        )
        if judgement.verdict != "fail" and judgement.observing:
            judgement = judge_wave(
                limits, self._health.health(key), started_at=wave.started_at, now=now
            )
        results = judgement.documents()
        if judgement.verdict == "wait":
            state = "observing" if judgement.observing else "assigned"
            if state != wave.state or results != wave.gate_results:
                self._store.save_judgement(record.id, wave.number, state, results, now=now)
            if state != wave.state:
                return f"wave {wave.number} observing: {judgement.reason}"
            return None
        self._health.forget(key)
        if judgement.verdict == "pass":
            self._store.save_judgement(record.id, wave.number, "passed", results, now=now)
            return f"wave {wave.number} passed every gate"
        self._store.save_judgement(record.id, wave.number, "failed", results, now=now)
        reason = f"wave {wave.number} failed: {judgement.reason}"
        self._store.change_state(
            record.id, "halt", actor=DRIVER_ACTOR, now=now, reason=reason, expect=record.state
        )
        if record.auto_rollback:
            self._rollback(record.id, DRIVER_ACTOR, now, reason=f"{reason}; rolled back")
            return f"halted and rolled back: {reason}"
        return f"halted: {reason}"


def _key(record: RolloutRecord, number: int) -> WaveKey:
    started = record.waves[number].started_at
    return WaveKey(record.id, number, record.release_path, record.model, started or _EPOCH)


_EPOCH: Final = datetime.fromtimestamp(0, timezone.utc)


def _target_of(model: str | None) -> str | None:
    """The release target path of a device's ``name@version``, None if it has none."""
    if not model:
        return None
    name, sep, version = model.partition("@")
    return release_path(name, version) if sep and name and version else None
