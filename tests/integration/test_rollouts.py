"""Staged rollouts end to end on a real signed repository and a real SQLite database.

The repository holds two real releases of the reference model (``models/reference-onnx``
as 1.0.0 and the same files re-sealed as 1.1.0). Devices are seeded through the
telemetry store from state messages; "devices" then report update events and telemetry
windows through the same protocol encoders the agent uses, and the service's ``tick`` is
driven with explicit times. The tests that exercise the most queries run on SQLite
and on PostgreSQL.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from tuf.api.metadata import Metadata, Targets  # type: ignore[attr-defined]

from edge_agent.bundle import seal_bundle
from edge_agent.protocol import topics
from edge_agent.protocol.events import EventKind, UpdateEvent, encode_event
from edge_agent.protocol.state import DeviceState, Status
from edge_agent.protocol.telemetry import TelemetryWindow, decode_window, encode_window
from edge_agent.update.unpack import pack_bundle
from fleet_server.compatibility import find_profiles
from fleet_server.repository import FleetRepository, init_keys, release_path
from fleet_server.rollouts import (
    Conflict,
    GateLimits,
    NotFound,
    Registry,
    RolloutError,
    RolloutService,
    RolloutTarget,
    RolloutView,
    WaveSpec,
)
from fleet_server.storage import TelemetryStore, open_database
from fleet_server.storage.audit import AuditLog
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.rollout_store import RolloutStore
from fleet_server.storage.schema import AlertRow, Device, UpdateEventRow
from fleet_server.workers.update_events import UpdateEventIngest
from tests.fleet_simulator import wait_for
from tests.mqtt_broker import MosquittoBroker, connect, mosquitto_broker  # noqa: F401

pytest_plugins = ("tests.postgres",)

ROOT = Path(__file__).resolve().parents[2]
PROFILES = find_profiles([ROOT / "firmware_profiles"])
NAME = "reference-onnx"
OLD, NEW = f"{NAME}@1.0.0", f"{NAME}@1.1.0"
OLD_PATH, NEW_PATH = release_path(NAME, "1.0.0"), release_path(NAME, "1.1.0")
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
# p99 in [7.5, 10) ms on the protocol's fixed latency edges.
LATENCY = [0, 0, 20, 60, 60, 60, 0, 0, 0, 0, 0, 0, 0]
FAST_GATES = GateLimits(observe_s=10.0, min_frames=300, timeout_s=600.0)
CANARY_PLAN = [WaveSpec(devices=1), WaveSpec(percent=50), WaveSpec(percent=100)]


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys and a repository with both releases, made once and copied per test."""
    root = tmp_path_factory.mktemp("signed")
    init_keys(root / "keys")
    repository = FleetRepository(
        root / "repo" / "metadata", root / "keys", root / "repo" / "targets"
    )
    repository.create(now=NOW - timedelta(days=1))
    newer = root / "bundles" / "new"
    shutil.copytree(ROOT / "models" / NAME, newer)
    draft = json.loads((newer / "bundle.json").read_bytes())
    del draft["files"]
    draft["version"] = "1.1.0"
    seal_bundle(newer, draft)
    for version, bundle in (("1.0.0", ROOT / "models" / NAME), ("1.1.0", newer)):
        tar = root / "bundles" / f"{version}.tar"
        pack_bundle(bundle, tar)
        repository.add_release(
            NAME,
            version,
            tar,
            runtime="onnx",
            profiles=sorted(PROFILES),
            now=NOW - timedelta(days=1),
        )
    return root


@dataclass
class Fleet:
    repository: FleetRepository
    engine: Engine
    telemetry: TelemetryStore
    seqs: dict[str, int] = field(default_factory=dict)

    def service(self) -> RolloutService:
        """A fresh service each time: all rollout state must live in the database."""
        return RolloutService(self.engine, self.repository, profiles=PROFILES)

    def window(
        self, device_id: str, model: str, at: datetime, *, fail: int = 4, error: int = 0
    ) -> None:
        """One 200-frame window of ``model`` as the agent's encoder writes it."""
        seq = self.seqs.get(device_id, 0) + 1
        self.seqs[device_id] = seq
        frames = 200
        window = TelemetryWindow(
            seq=seq,
            t0=int(at.timestamp()) - 60,
            t1=int(at.timestamp()),
            model=model,
            edge="0.1.0",
            ref="0" * 16,
            counts={"pass": frames - fail - error, "fail": fail, "uncertain": 0, "error": error},
            latency=LATENCY,
        )
        payload = encode_window(window)
        stored = self.telemetry.add_window(
            device_id, decode_window(payload), json.loads(payload), at
        )
        assert stored

    def activate(self, device_id: str, at: datetime, *, agreement: float = 0.995) -> None:
        """The device's update events for the new release, then its new state."""
        service = self.service()
        figures = {"agreement": agreement, "p99_latency_ms": 9.0, "frames": 300.0}
        for kind in (EventKind.DOWNLOADING, EventKind.GATE_PASSED, EventKind.ACTIVATED):
            event = UpdateEvent(
                kind,
                at.timestamp(),
                target=NEW_PATH,
                figures=figures if kind is EventKind.GATE_PASSED else {},
            )
            service.record_event(device_id, event, at)
        self.telemetry.record_state(device_id, DeviceState(Status.ONLINE, model=NEW), at)

    def healthy_switch(self, device_id: str, at: datetime) -> None:
        self.activate(device_id, at)
        self.window(device_id, NEW, at + timedelta(seconds=1))
        self.window(device_id, NEW, at + timedelta(seconds=2))

    def assignments(self) -> dict[str, str]:
        return self.repository.assignments()


@pytest.fixture
def fleet(tmp_path: Path, signed: Path) -> Iterator[Fleet]:
    """Ten devices on 1.0.0 with telemetry, in a SQLite file."""
    yield from _fleet(tmp_path, signed, f"sqlite:///{tmp_path / 'fleet.db'}")


@pytest.fixture
def fleet_any_db(tmp_path: Path, signed: Path, db_url: str) -> Iterator[Fleet]:
    """The same fleet in a SQLite file, then in PostgreSQL."""
    yield from _fleet(tmp_path, signed, db_url)


def _fleet(tmp_path: Path, signed: Path, db_url: str) -> Iterator[Fleet]:
    shutil.copytree(signed / "keys", tmp_path / "keys")
    shutil.copytree(signed / "repo", tmp_path / "repo")
    repository = FleetRepository(
        tmp_path / "repo" / "metadata", tmp_path / "keys", tmp_path / "repo" / "targets"
    )
    engine = open_database(db_url)
    assert Registry(engine).sync(repository, now=NOW - timedelta(hours=2)) == 2
    telemetry = TelemetryStore(engine)
    rig = Fleet(repository, engine, telemetry)
    for i in range(10):
        device_id = f"cam-{i:02d}"
        profile = ("rpi4", "rpi5", "x86-generic")[i % 3]
        state = DeviceState(Status.ONLINE, model=OLD, profile=profile, line=f"line-{i % 2 + 1}")
        telemetry.record_state(device_id, state, NOW - timedelta(hours=1))
        for k in range(3):
            rig.window(device_id, OLD, NOW - timedelta(minutes=30 - k))
    yield rig
    engine.dispose()


def _create(
    fleet: Fleet,
    *,
    auto_rollback: bool = True,
    target: RolloutTarget | None = None,
    gates: GateLimits = FAST_GATES,
    actor: str = "alice",
) -> RolloutView:
    return fleet.service().create(
        NEW,
        target or RolloutTarget(),
        CANARY_PLAN,
        gates,
        pause_s=30.0,
        auto_rollback=auto_rollback,
        actor=actor,
        now=NOW,
    )


def _at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def _wave_devices(view: RolloutView, number: int) -> list[str]:
    return [d.device_id for d in view.devices if d.wave == number]


def _actions(fleet: Fleet, rollout_id: int) -> list[tuple[str, str]]:
    entries = AuditLog(fleet.engine).entries(subject=f"rollout/{rollout_id}")
    return [(e.actor, e.action) for e in reversed(entries)]


def test_a_healthy_rollout_goes_wave_by_wave_to_completion(fleet_any_db: Fleet) -> None:
    fleet = fleet_any_db
    view = _create(fleet)
    assert (view.state, [w.size for w in view.waves]) == ("running", [1, 4, 5])
    assert all(w.state == "pending" for w in view.waves)
    assert fleet.assignments() == {}
    json.dumps(view.document())  # JSON-able as the API sends it

    lines = fleet.service().tick(_at(0))
    assert lines == [f"rollout {view.id}: wave 0 assigned {NEW} to 1 device(s)"]
    canary = _wave_devices(view, 0)
    assert fleet.assignments() == {canary[0]: NEW_PATH}
    director = Metadata[Targets].from_file(str(fleet.repository.metadata_dir / "director.json"))
    assert set(director.signed.targets) == {f"assignments/{canary[0]}"}
    assert fleet.service().tick(_at(1)) == []  # idempotent: nothing due

    fleet.healthy_switch(canary[0], _at(5))
    assert "observing" in fleet.service().tick(_at(8))[0]
    assert fleet.service().get(view.id).waves[0].state == "observing"
    lines = fleet.service().tick(_at(16))
    assert "wave 0 passed every gate" in lines[0]
    assert "wave 1 follows after 30 s" in lines[1]
    passed = fleet.service().get(view.id).waves[0]
    assert passed.state == "passed"
    assert passed.gate_results["agreement"]["value"] == pytest.approx(0.995)
    assert passed.gate_results["p99_latency_ms"]["value"] == 10.0  # telemetry upper edge
    assert passed.gate_results["fail_rate_change"]["value"] == pytest.approx(0.0)
    assert all(r["passed"] for r in passed.gate_results.values())

    assert fleet.service().tick(_at(40)) == []  # the pause is not over
    assert "wave 1 assigned" in fleet.service().tick(_at(47))[0]
    second = _wave_devices(view, 1)
    assert set(fleet.assignments()) == {*canary, *second}
    for device_id in second:
        fleet.healthy_switch(device_id, _at(50))
    fleet.service().tick(_at(55))
    assert "wave 1 passed" in fleet.service().tick(_at(61))[0]
    assert "wave 2 assigned" in fleet.service().tick(_at(92))[0]
    for device_id in _wave_devices(view, 2):
        fleet.healthy_switch(device_id, _at(95))
    fleet.service().tick(_at(100))
    lines = fleet.service().tick(_at(106))
    assert lines[-1] == f"rollout {view.id}: completed: every wave of {NEW} passed its gates"

    done = fleet.service().get(view.id)
    assert done.state == "completed"
    assert [w.state for w in done.waves] == ["passed"] * 3
    assert {d.status for d in done.devices} == {"activated"}
    assert fleet.assignments() == {f"cam-{i:02d}": NEW_PATH for i in range(10)}
    assert fleet.service().list(active_only=True) == []
    assert _actions(fleet, view.id) == [
        ("alice", "rollout.create"),
        ("rollout-driver", "rollout.assign_wave"),
        ("rollout-driver", "rollout.next_wave"),
        ("rollout-driver", "rollout.assign_wave"),
        ("rollout-driver", "rollout.next_wave"),
        ("rollout-driver", "rollout.assign_wave"),
        ("rollout-driver", "rollout.complete"),
    ]
    assert Registry(fleet.engine).release(NEW).running_on == 10


def test_a_failing_gate_halts_and_rolls_back_to_the_previous_release(fleet_any_db: Fleet) -> None:
    fleet = fleet_any_db
    view = _create(fleet, auto_rollback=True)
    fleet.service().tick(_at(0))
    canary = _wave_devices(view, 0)[0]
    fleet.activate(canary, _at(5), agreement=0.91)  # the shadow run disagrees
    fleet.window(canary, NEW, _at(6))
    fleet.window(canary, NEW, _at(7))
    lines = fleet.service().tick(_at(20))
    assert "halted and rolled back" in lines[-1]
    assert "agreement" in lines[-1]

    after = fleet.service().get(view.id)
    assert after.state == "rolled_back"
    assert "wave 0 failed" in (after.reason or "")
    assert after.waves[0].state == "rolled_back"
    assert after.waves[0].gate_results["agreement"]["passed"] is False
    assert [w.state for w in after.waves[1:]] == ["aborted", "aborted"]
    assert fleet.assignments() == {canary: OLD_PATH}
    device = next(d for d in after.devices if d.device_id == canary)
    assert (device.status, device.reason) == ("rolled_back", f"rolled back to {OLD_PATH}")
    assert _actions(fleet, view.id)[-2:] == [
        ("rollout-driver", "rollout.halt"),
        ("rollout-driver", "rollout.rollback"),
    ]
    assert fleet.service().tick(_at(60)) == []  # finished rollouts are not stepped


def test_a_fail_rate_jump_halts_and_an_operator_rolls_back(fleet: Fleet) -> None:
    view = _create(fleet, auto_rollback=False)
    fleet.service().tick(_at(0))
    canary = _wave_devices(view, 0)[0]
    fleet.activate(canary, _at(5))
    fleet.window(canary, NEW, _at(6), fail=40)  # 2 % before, 20 % after
    fleet.window(canary, NEW, _at(7), fail=40)
    assert "halted: wave 0 failed: fail_rate_change" in fleet.service().tick(_at(20))[-1]
    halted = fleet.service().get(view.id)
    assert halted.state == "halted"
    assert halted.waves[0].gate_results["fail_rate_change"]["value"] == pytest.approx(0.18)
    assert fleet.assignments() == {canary: NEW_PATH}  # no automatic rollback

    with pytest.raises(Conflict, match="cannot resume a rollout that is halted"):
        fleet.service().resume(view.id, actor="bob", now=_at(30))
    rolled = fleet.service().rollback(view.id, actor="bob", now=_at(31))
    assert rolled.state == "rolled_back"
    assert fleet.assignments() == {canary: OLD_PATH}
    assert _actions(fleet, view.id)[-1] == ("bob", "rollout.rollback")
    with pytest.raises(Conflict, match="cannot rollback a rollout that is rolled_back"):
        fleet.service().rollback(view.id, actor="bob", now=_at(32))


def test_a_refused_update_halts_at_once(fleet: Fleet) -> None:
    view = _create(fleet, auto_rollback=False)
    fleet.service().tick(_at(0))
    canary = _wave_devices(view, 0)[0]
    refused = UpdateEvent(
        EventKind.REFUSED, 1.0, target=NEW_PATH, reason="incompatible", detail="too big"
    )
    fleet.service().record_event(canary, refused, _at(3))
    assert "halted" in fleet.service().tick(_at(4))[-1]
    after = fleet.service().get(view.id)
    device = next(d for d in after.devices if d.device_id == canary)
    assert (device.status, device.reason) == ("failed", "refused: incompatible: too big")
    assert "refused: incompatible" in after.waves[0].gate_results["activated"]["detail"]


def test_a_silent_wave_times_out(fleet: Fleet) -> None:
    view = _create(fleet, auto_rollback=False)
    fleet.service().tick(_at(0))
    retry = UpdateEvent(
        EventKind.FAILED, 1.0, target=NEW_PATH, reason="transport", detail="no answer"
    )
    fleet.service().record_event(_wave_devices(view, 0)[0], retry, _at(5))
    assert fleet.service().tick(_at(599)) == []
    assert "timeout" in fleet.service().tick(_at(600))[-1]
    after = fleet.service().get(view.id)
    assert after.state == "halted"
    assert after.waves[0].gate_results["timeout"]["passed"] is False
    assert after.devices[0].reason == "retrying after failed: transport: no answer"


def test_a_drift_alert_after_the_switch_fails_the_wave(fleet_any_db: Fleet) -> None:
    fleet = fleet_any_db
    view = _create(fleet, auto_rollback=False)
    fleet.service().tick(_at(0))
    canary = _wave_devices(view, 0)[0]
    # Open before the switch (does not count), then a new one after it (counts).
    _open_alert(fleet.engine, canary, "contrast", NOW - timedelta(minutes=5))
    fleet.healthy_switch(canary, _at(5))
    _open_alert(fleet.engine, canary, "brightness", _at(9))
    assert "new_drift_alerts" in fleet.service().tick(_at(20))[-1]
    result = fleet.service().get(view.id).waves[0].gate_results["new_drift_alerts"]
    assert (result["value"], result["passed"]) == (1.0, False)


def test_pause_resume_and_abort(fleet: Fleet) -> None:
    view = _create(fleet)
    paused = fleet.service().pause(view.id, actor="carol", now=_at(1))
    assert paused.state == "paused"
    assert fleet.service().tick(_at(2)) == []  # no wave starts while paused
    assert fleet.assignments() == {}
    assert fleet.service().resume(view.id, actor="carol", now=_at(3)).state == "running"
    assert "wave 0 assigned" in fleet.service().tick(_at(4))[0]

    # Paused during the canary's observation: the wave is judged, the next does not start.
    fleet.service().pause(view.id, actor="carol", now=_at(5))
    fleet.healthy_switch(_wave_devices(view, 0)[0], _at(6))
    assert "wave 0 passed" in fleet.service().tick(_at(20))[-1]
    assert fleet.service().tick(_at(60)) == []
    assert fleet.service().get(view.id).current_wave == 0

    aborted = fleet.service().abort(view.id, actor="carol", now=_at(61))
    assert aborted.state == "aborted"
    assert [w.state for w in aborted.waves] == ["passed", "aborted", "aborted"]
    assert fleet.service().tick(_at(100)) == []
    assert len(fleet.assignments()) == 1  # devices keep what they run
    with pytest.raises(Conflict, match="cannot pause a rollout that is aborted"):
        fleet.service().pause(view.id, actor="carol", now=_at(101))
    assert _actions(fleet, view.id) == [
        ("alice", "rollout.create"),
        ("carol", "rollout.pause"),
        ("carol", "rollout.resume"),
        ("rollout-driver", "rollout.assign_wave"),
        ("carol", "rollout.pause"),
        ("carol", "rollout.abort"),
    ]


def test_targets_preview_and_skip_reasons(fleet: Fleet) -> None:
    fleet.telemetry.record_state(
        "cam-new", DeviceState(Status.ONLINE, model=OLD), NOW
    )  # no profile
    fleet.telemetry.record_state(
        "cam-jet", DeviceState(Status.ONLINE, model=OLD, profile="bogus"), NOW
    )
    preview = fleet.service().preview(
        NEW_PATH,
        RolloutTarget(
            groups=("line-1",),
            devices=("cam-00", "cam-02", "cam-01", "cam-jet", "cam-new", "ghost"),
        ),
    )
    assert preview.targeted == ("cam-00", "cam-02")
    skipped = dict(preview.skipped)
    assert set(skipped) == {"ghost"}  # cam-jet/cam-new report no line: not selected at all
    everyone = fleet.service().preview(NEW, RolloutTarget())
    assert len(everyone.targeted) == 10
    reasons = dict(everyone.skipped)
    assert "has not reported" in reasons["cam-new"]
    assert "unknown to the server" in reasons["cam-jet"]

    view = _create(fleet, target=RolloutTarget(sites=()))
    skipped_rows = {d.device_id: d.reason for d in view.devices if d.wave is None}
    assert set(skipped_rows) == {"cam-new", "cam-jet"}
    assert all(d.status == "skipped" for d in view.devices if d.wave is None)


def test_refusals_are_conflicts_or_not_found(fleet: Fleet) -> None:
    with pytest.raises(NotFound, match=r"no release 'reference-onnx@9\.9\.9'"):
        fleet.service().preview(f"{NAME}@9.9.9", RolloutTarget())
    read_only = RolloutService(fleet.engine, None, profiles=PROFILES)
    with pytest.raises(Conflict, match="read-only"):
        read_only.create(
            NEW,
            RolloutTarget(),
            CANARY_PLAN,
            FAST_GATES,
            pause_s=0,
            auto_rollback=False,
            actor="a",
            now=NOW,
        )
    with pytest.raises(Conflict, match="no device to roll out to"):
        fleet.service().create(
            OLD,
            RolloutTarget(),
            CANARY_PLAN,
            FAST_GATES,
            pause_s=0,
            auto_rollback=False,
            actor="a",
            now=NOW,
        )
    with pytest.raises(RolloutError, match="last wave must reach all 10"):
        fleet.service().create(
            NEW,
            RolloutTarget(),
            [WaveSpec(devices=1)],
            FAST_GATES,
            pause_s=0,
            auto_rollback=False,
            actor="a",
            now=NOW,
        )
    first = _create(fleet)
    with pytest.raises(Conflict, match="in unfinished rollouts"):
        _create(fleet, target=RolloutTarget(devices=("cam-03",)))
    with pytest.raises(Conflict, match="has assigned no device yet"):
        fleet.service().rollback(first.id, actor="a", now=NOW)
    with pytest.raises(NotFound, match="no rollout 999"):
        fleet.service().get(999)
    with pytest.raises(NotFound):
        fleet.service().pause(999, actor="a", now=NOW)
    assert [v.id for v in fleet.service().list()] == [first.id]


def test_update_events_arrive_over_mqtt(fleet: Fleet, mosquitto: MosquittoBroker) -> None:
    view = _create(fleet)
    fleet.service().tick(_at(0))
    canary = _wave_devices(view, 0)[0]
    ingest = UpdateEventIngest(fleet.service(), lambda: _at(3))
    server = connect(mosquitto, "fleet-server")
    device = connect(mosquitto, canary)
    topic = topics.events(canary)
    try:
        server.subscribe(topics.device_filter("events"), ingest.handle, qos=1)
        # The subscription is live once a probe gets through (SUBACK is not awaited).
        probe = encode_event(UpdateEvent(EventKind.CHECKING, 1.0))
        assert wait_for(lambda: device.publish(topic, probe) and ingest.counters.events > 0, 5, 0.2)
        assert device.publish(topic, b"{not json", qos=1)
        activated = UpdateEvent(EventKind.ACTIVATED, 2.0, target=NEW_PATH, detail="slot b")
        assert device.publish(topic, encode_event(activated), qos=1)
        # One publisher, one topic, QoS 1: delivered in order, so the bad payload is
        # handled before the activation.
        assert wait_for(lambda: _status(fleet, view.id, canary) == "activated", 5)
    finally:
        device.stop()
        server.stop()
        ingest.stop()
    assert ingest.counters.rejected == 1
    row = next(d for d in fleet.service().get(view.id).devices if d.device_id == canary)
    assert row.activated_at == _at(3)
    with Transaction(session_factory(fleet.engine)(), "reading events") as session:
        stored = list(
            session.scalars(
                select(UpdateEventRow).where(
                    UpdateEventRow.device_id == canary, UpdateEventRow.event == "activated"
                )
            )
        )
    assert [(e.target, e.detail) for e in stored] == [(NEW_PATH, "slot b")]


def _status(fleet: Fleet, rollout_id: int, device_id: str) -> str:
    view = fleet.service().get(rollout_id)
    return next(d.status for d in view.devices if d.device_id == device_id)


def test_the_ingest_rejects_foreign_topics_and_bad_payloads(fleet: Fleet) -> None:
    ingest = UpdateEventIngest(fleet.service(), lambda: NOW)
    try:
        ingest.handle("edgefleet/v1/devices/cam-00/state", b"{}")
        ingest.handle(topics.events("cam-00"), b'{"v":1,"event":"exploded","ts":1}')
        ingest.handle(topics.events("cam-00"), encode_event(UpdateEvent(EventKind.CHECKING, 1.0)))
        assert wait_for(lambda: ingest.counters.events == 1, 5)
    finally:
        ingest.stop()
    assert ingest.counters.rejected == 2


def test_a_burst_of_events_is_stored_in_batches_in_order(fleet: Fleet) -> None:
    view = _create(fleet)
    fleet.service().tick(_at(0))
    canary = _wave_devices(view, 0)[0]
    ingest = UpdateEventIngest(fleet.service(), lambda: _at(3))
    kinds = [EventKind.DOWNLOADING] * 300 + [EventKind.GATE_PASSED, EventKind.ACTIVATED]
    try:
        for kind in kinds:
            event = UpdateEvent(
                kind, 1.0, target=NEW_PATH, percent=50 if kind is EventKind.DOWNLOADING else None
            )
            ingest.handle(topics.events(canary), encode_event(event))
        others = [f"cam-{i:02d}" for i in range(10) if f"cam-{i:02d}" != canary]
        for device_id in others:  # not assigned yet: stored, no status change
            ingest.handle(
                topics.events(device_id),
                encode_event(UpdateEvent(EventKind.ACTIVATED, 1.0, target=NEW_PATH)),
            )
        assert wait_for(lambda: ingest.counters.events == len(kinds) + len(others), 10)
    finally:
        ingest.stop()
    statuses = {d.device_id: d.status for d in fleet.service().get(view.id).devices}
    assert statuses[canary] == "activated"
    assert {statuses[d] for d in others} == {"pending"}


def _open_alert(engine: Engine, device_id: str, feature: str, at: datetime) -> None:
    with Transaction(session_factory(engine)(), "opening an alert") as session:
        assert session.get(Device, device_id) is not None
        session.add(
            AlertRow(
                scope="device",
                scope_key=device_id,
                feature=feature,
                test="cusum",
                direction="down",
                effect=0.5,
                statistic=9.0,
                threshold=5.0,
                p_value=None,
                since_seq=1,
                since_t=at,
                devices=[device_id],
                evidence={},
                opened_at=at,
                updated_at=at,
            )
        )


def test_a_step_another_process_already_took_is_refused(fleet: Fleet) -> None:
    """Two servers stepping one rollout: the second one's stale step changes nothing."""
    view = _create(fleet)
    store = RolloutStore(fleet.engine)
    fleet.service().tick(_at(0))
    with pytest.raises(Conflict, match=r"wave 0 of rollout \d+ is assigned"):
        store.mark_assigned(view.id, 0, ["cam-00"], actor="other", now=_at(1))
    fleet.healthy_switch(_wave_devices(view, 0)[0], _at(5))
    fleet.service().tick(_at(16))  # passed and advanced to wave 1
    with pytest.raises(Conflict, match="is at wave 1 already"):
        store.advance(view.id, 0, actor="other", now=_at(17))
    with pytest.raises(Conflict, match=r"wave 0 of rollout \d+ is passed already"):
        store.save_judgement(view.id, 0, "failed", {}, now=_at(17))
    assert fleet.service().get(view.id).current_wave == 1


def test_rolling_back_an_old_rollout_does_not_undo_a_later_one(fleet: Fleet) -> None:
    service = fleet.service()
    one = RolloutTarget(devices=("cam-00",))
    first = service.create(
        NEW,
        one,
        [WaveSpec(percent=100)],
        FAST_GATES,
        pause_s=0,
        auto_rollback=False,
        actor="a",
        now=NOW,
    )
    service.tick(_at(0))
    fleet.healthy_switch("cam-00", _at(1))
    assert "completed" in service.tick(_at(12))[-1]
    # A later rollout takes cam-00 back to 1.0.0 by its own decision.
    second = service.create(
        OLD,
        one,
        [WaveSpec(percent=100)],
        FAST_GATES,
        pause_s=0,
        auto_rollback=False,
        actor="a",
        now=_at(20),
    )
    assert second.devices[0].status == "pending"
    service.tick(_at(21))
    moved_on = service.rollback(first.id, actor="b", now=_at(22))
    assert moved_on.state == "rolled_back"
    assert moved_on.devices[0].status == "activated"
    assert moved_on.devices[0].reason == f"not rolled back: it is assigned {OLD_PATH} now"
    assert fleet.assignments() == {"cam-00": OLD_PATH}
