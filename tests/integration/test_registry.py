"""The model registry mirrored from a real signed repository, and the director's
``assign_many`` (one signing for many devices). The registry's queries run on SQLite and
on PostgreSQL."""

from __future__ import annotations

import json
import shutil
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Targets  # type: ignore[attr-defined]

from edge_agent.protocol.state import DeviceState, Status
from edge_agent.update.unpack import pack_bundle
from fleet_server.repository import FleetRepository, RepositoryError, init_keys, release_path
from fleet_server.rollouts import NotFound, Registry
from fleet_server.storage import TelemetryStore, open_database
from fleet_server.storage.audit import AuditLog

pytest_plugins = ("tests.postgres",)

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "reference-onnx"
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
PATH = release_path("reference-onnx", "1.0.0")


@pytest.fixture
def repository(tmp_path: Path) -> FleetRepository:
    init_keys(tmp_path / "keys")
    repo = FleetRepository(
        tmp_path / "repo" / "metadata", tmp_path / "keys", tmp_path / "repo" / "targets"
    )
    repo.create(now=NOW)
    tar = tmp_path / "bundle.tar"
    pack_bundle(BUNDLE, tar)
    repo.add_release(
        "reference-onnx", "1.0.0", tar, runtime="onnx", profiles=["rpi4", "x86-generic"], now=NOW
    )
    return repo


def test_sync_mirrors_the_signed_releases_with_their_model_card(
    db_url: str, repository: FleetRepository
) -> None:
    engine = open_database(db_url)
    registry = Registry(engine)
    assert registry.sync(repository, now=NOW) == 1
    assert registry.sync(repository, now=NOW + timedelta(minutes=1)) == 0  # nothing new

    telemetry = TelemetryStore(engine)
    for device_id in ("cam-1", "cam-2"):
        state = DeviceState(Status.ONLINE, model="reference-onnx@1.0.0", profile="rpi4")
        telemetry.record_state(device_id, state, NOW)
    (release,) = registry.releases()
    signed = repository.released(PATH)
    assert signed is not None
    assert (release.target_path, release.model, release.runtime) == (
        PATH,
        "reference-onnx@1.0.0",
        "onnx",
    )
    assert release.profiles == ("rpi4", "x86-generic")
    assert (release.size, release.sha256) == (signed.length, signed.hashes["sha256"])
    assert (release.release_counter, release.running_on) == (1, 2)
    manifest = json.loads((BUNDLE / "bundle.json").read_bytes())
    card = release.model_card
    assert card["description"] == manifest["description"]
    assert card["labels"] == ["ok", "defect"]
    assert card["input"] == {"width": 160, "height": 120, "color": "RGB", "layout": "NCHW"}
    assert card["golden_samples"] == 6
    assert card["reference_profile"] is True
    json.dumps(release.document())

    for key in (str(release.id), PATH, "reference-onnx@1.0.0"):
        assert registry.release(key) == release
    for key, message in (
        ("999", "no release '999'"),
        ("reference-onnx", "give an id"),
        ("models/x-1.tar", "no release"),
    ):
        with pytest.raises(NotFound, match=message):
            registry.release(key)
    (entry,) = AuditLog(engine).entries(subject=f"release/{release.id}")
    assert (entry.actor, entry.action, entry.detail["target"]) == (
        "registry",
        "release.register",
        PATH,
    )
    engine.dispose()


def test_a_bundle_that_does_not_match_its_signature_gets_no_model_card(
    tmp_path: Path, repository: FleetRepository
) -> None:
    tar = repository.targets_dir / PATH
    data = bytearray(tar.read_bytes())
    data[-1] ^= 0xFF
    tar.write_bytes(bytes(data))
    engine = open_database(str(tmp_path / "fleet.db"))
    registry = Registry(engine)
    assert registry.sync(repository, now=NOW) == 1
    card = registry.release(PATH).model_card
    assert card == {"unavailable": f"{PATH} does not match its signed length and sha256"}
    engine.dispose()


def test_assign_many_signs_the_director_once_for_every_device(repository: FleetRepository) -> None:
    director_file = repository.metadata_dir / "director.json"
    before = Metadata[Targets].from_file(str(director_file)).signed.version
    devices = {f"cam-{i}": PATH for i in range(50)}
    repository.assign_many(devices, now=NOW)
    director = Metadata[Targets].from_file(str(director_file))
    assert director.signed.version == before + 1
    assert set(director.signed.targets) == {f"assignments/{d}" for d in devices}
    assert repository.assignments() == devices
    for device_id in devices:
        info = director.signed.targets[f"assignments/{device_id}"]
        published = repository.targets_dir / info.path
        with published.open("rb") as f:
            info.verify_length_and_hashes(f)
        assert stat.S_IMODE(published.stat().st_mode) == 0o644  # served as is
    # No staging file is left beside the published ones.
    assert len(list((repository.targets_dir / "assignments").iterdir())) == len(devices)

    repository.assign_many({}, now=NOW)  # nothing to sign
    assert Metadata[Targets].from_file(str(director_file)).signed.version == before + 1


def test_assign_many_is_all_or_nothing(repository: FleetRepository) -> None:
    with pytest.raises(RepositoryError, match=r"'models/ghost-1\.tar' \(for device 'cam-2'\)"):
        repository.assign_many({"cam-1": PATH, "cam-2": "models/ghost-1.tar"}, now=NOW)
    with pytest.raises(RepositoryError, match="invalid device id"):
        repository.assign_many({"../x": PATH}, now=NOW)
    assert repository.assignments() == {}


def test_a_rollback_assigns_the_previous_target_again(
    tmp_path: Path, repository: FleetRepository
) -> None:
    newer = tmp_path / "newer"
    shutil.copytree(BUNDLE, newer)
    tar = tmp_path / "newer.tar"
    pack_bundle(newer, tar)  # the same files: a second release of identical bytes
    repository.add_release(
        "reference-onnx", "1.1.0", tar, runtime="onnx", profiles=["rpi4"], now=NOW
    )
    newer_path = release_path("reference-onnx", "1.1.0")
    repository.assign_many({"cam-1": newer_path}, now=NOW)
    repository.assign_many({"cam-1": PATH}, now=NOW + timedelta(seconds=1))
    assert repository.assignments() == {"cam-1": PATH}
