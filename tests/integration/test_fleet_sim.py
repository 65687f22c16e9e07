"""The fleet simulation against a real Mosquitto, a real signed repository, the real chunk
server and publisher: 20 devices in 2 processes.

One test, in steps that build on each other (starting 20 devices costs a few seconds):
an assignment reaches every device, each downloads, verifies and reports activated and its
retained state names the new model, and the bundle is read from the store once; then
devices refuse a release their runtime or their profile cannot run, and a served bundle
whose bytes differ from the signed ones, and keep their model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.protocol.events import EventKind
from edge_agent.protocol.state import Status
from fleet_server.repository import FleetRepository
from hil.fleet_rig import ServerRig, make_repository, release_bundle, utc_now
from hil.fleet_sim import FleetCounters, FleetSim, device_specs
from tests.integration.reference import ONNX_BUNDLE, TFLITE_BUNDLE
from tests.mqtt_broker import MosquittoBroker, mosquitto_broker  # noqa: F401

DEVICES = 20
PROFILES = ("x86-generic", "jetson-nano")  # jetson-nano has no tflite runtime
MODEL = "reference-onnx"
TIMEOUT_S = 30.0


@pytest.fixture
def repo(tmp_path: Path) -> FleetRepository:
    return make_repository(tmp_path / "fleet")


@pytest.fixture
def rig(mosquitto: MosquittoBroker, repo: FleetRepository) -> Iterator[ServerRig]:
    with ServerRig(mosquitto.host, mosquitto.port, repo, poll_interval_s=0.1) as running:
        yield running


def _activated(counters: FleetCounters, model: str) -> int:
    return counters.models.get(model, 0)


def _tamper(path: Path) -> None:
    """Replace ``path`` (a new inode, as a careless or hostile copy would) with the same
    length and one flipped byte in the middle."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


def test_fleet_sim_rollout_and_refusals(
    mosquitto: MosquittoBroker, repo: FleetRepository, rig: ServerRig, tmp_path: Path
) -> None:
    specs = device_specs(DEVICES, prefix="t", profiles=PROFILES, model=f"{MODEL}@1")
    ids = [s.device_id for s in specs]
    x86 = [s.device_id for s in specs if s.profile == "x86-generic"]
    jetson = [s.device_id for s in specs if s.profile == "jetson-nano"]
    work = tmp_path / "bundles"
    v2, v2_len = release_bundle(
        repo, ONNX_BUNDLE, "2", work, runtime="onnx", profiles=list(PROFILES)
    )
    root = repo.metadata_dir / "1.root.json"
    with FleetSim(
        mosquitto.host, mosquitto.port, specs, 2, root, work_dir=tmp_path / "sim", concurrency=4
    ) as sim:
        sim.wait_connected(TIMEOUT_S)
        ready = sim.wait_ready(TIMEOUT_S)
        assert set(ready.outcomes) == {"unchanged"}, ready

        # -- one wave to every device --------------------------------------------------
        repo.assign_many(dict.fromkeys(ids, v2), now=utc_now())
        done = sim.wait(
            lambda c: _activated(c, f"{MODEL}@2") == DEVICES, TIMEOUT_S, "activation of @2"
        )
        assert rig.wait_count(EventKind.ACTIVATED, v2, DEVICES, TIMEOUT_S)
        for device_id in ids:
            kinds = [e.event for e in rig.device_events(device_id) if e.target == v2]
            assert kinds[0] == EventKind.DOWNLOADING and kinds[-1] == EventKind.ACTIVATED
            assert EventKind.VERIFIED in kinds and EventKind.GATE_PASSED in kinds
            passed = next(e for e in rig.device_events(device_id) if e.event == "gate_passed")
            assert passed.figures["agreement"] == 1.0
        assert rig.wait_count(EventKind.ACTIVATED, None, DEVICES, 1)
        # The retained state of every device names the new model.
        states = dict(rig.states)
        assert {d: (s.status, s.model) for d, s in states.items() if d in ids} == dict.fromkeys(
            ids, (Status.ONLINE, f"{MODEL}@2")
        )
        assert {states[d].profile for d in jetson} == {"jetson-nano"}
        # Every device fetched the whole bundle; the server read it from its store once.
        assert done.get("bundle_bytes") == DEVICES * v2_len
        assert rig.chunks.bytes_read["targets/models"] == v2_len
        assert done.get("event.refused") == 0 and done.get("check_errors") == 0

        # -- refusals: runtime, profile, tampered bytes ----------------------------------
        tflite, _ = release_bundle(
            repo, TFLITE_BUNDLE, "2.0.0", work, runtime="tflite", profiles=list(PROFILES)
        )
        rpi_only, _ = release_bundle(
            repo, ONNX_BUNDLE, "3", work, runtime="onnx", profiles=["rpi4"]
        )
        tampered, _ = release_bundle(
            repo, ONNX_BUNDLE, "4", work, runtime="onnx", profiles=list(PROFILES)
        )
        _tamper(repo.targets_dir / tampered)
        offers = {jetson[0]: tflite, x86[0]: rpi_only, x86[1]: tampered}
        repo.assign_many(offers, now=utc_now())

        # A device that checks while the next release is being written may also refuse
        # with reason "metadata" (a snapshot or timestamp newer than the one it just got:
        # consistent snapshots are off) and checks again at the next notify.
        def refusals(device: str) -> list[tuple[str | None, str]]:
            return [
                (e.reason, e.detail or "")
                for e in rig.device_events(device)
                if e.event == "refused" and e.reason != "metadata"
            ]

        assert rig.wait_until(lambda: all(refusals(d) for d in offers), TIMEOUT_S), rig.kinds
        reasons = {device: [reason for reason, _ in refusals(device)] for device in offers}
        assert reasons == {
            jetson[0]: ["incompatible"],
            x86[0]: ["incompatible"],
            x86[1]: ["hash_mismatch"],
        }
        # A refusal by the release checks names the target only in its detail.
        assert f"{tflite} needs runtime 'tflite'" in refusals(jetson[0])[0][1]
        assert f"{rpi_only} is released for profiles ['rpi4']" in refusals(x86[0])[0][1]
        # The tampered bundle was refused on its hash, never reported verified.
        assert EventKind.VERIFIED not in [
            e.event for e in rig.device_events(x86[1]) if e.target == tampered
        ]
        final = sim.counters()
        assert _activated(final, f"{MODEL}@2") == DEVICES, final.models
        assert rig.count(EventKind.ACTIVATED, tflite) == 0
        assert rig.count(EventKind.ACTIVATED, rpi_only) == 0
        assert rig.count(EventKind.ACTIVATED, tampered) == 0
        assert rig.states[x86[1]].model == f"{MODEL}@2"
        assert final.get("check_errors") == 0
    assert rig.bad_messages == 0
