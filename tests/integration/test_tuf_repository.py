"""The fleet TUF repository, checked by the real python-tuf client (ngclient.Updater).

The device side is a real ``Updater`` bootstrapped with ``1.root.json``; its fetcher reads
the repository's published directories directly (no network). The attacks re-sign one
role's metadata with a chosen key and keep snapshot and timestamp properly signed, so only
the role layout (ADR 6) stands between the forged target and the device.
"""

from __future__ import annotations

import json
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import unquote

import pytest

# Both packages re-export these names without __all__, which mypy --strict flags.
from securesystemslib.signer import CryptoSigner, Signer  # type: ignore[attr-defined]
from tuf.api.exceptions import (
    DownloadError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
    UnsignedMetadataError,
)
from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    MetaFile,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from fleet_server.repository import (
    DIRECTOR_ROLE,
    RELEASE_ROLE,
    TARGETS_ROLE,
    ExpiryPolicy,
    FleetRepository,
    RepositoryError,
    init_keys,
    load_signers,
    release_path,
)

METADATA_URL = "https://fleet.test/metadata/"
TARGETS_URL = "https://fleet.test/targets/"
BUNDLE = b"model bundle bytes " * 64


class DirectoryFetcher(FetcherInterface):
    """Serves ``<base URL><path>`` from ``<directory>/<path>``; anything else is a 404."""

    def __init__(self, roots: dict[str, Path]) -> None:
        self._roots = {prefix: root.resolve() for prefix, root in roots.items()}

    def _fetch(self, url: str) -> Iterator[bytes]:
        for prefix, root in self._roots.items():
            if url.startswith(prefix):
                path = (root / unquote(url[len(prefix) :])).resolve()
                if path.is_relative_to(root) and path.is_file():
                    return iter([path.read_bytes()])
        raise DownloadHTTPError(f"not found: {url}", 404)


def _now() -> datetime:
    # The Updater checks expiry against the real clock, so the repository signs near it.
    return datetime.now(timezone.utc)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    keys = tmp_path / "keys"
    init_keys(keys)
    return keys


@pytest.fixture
def fleet(tmp_path: Path, key_dir: Path) -> FleetRepository:
    repo = FleetRepository(
        tmp_path / "published" / "metadata", key_dir, tmp_path / "published" / "targets"
    )
    repo.create(now=_now())
    return repo


@pytest.fixture
def device(tmp_path: Path, fleet: FleetRepository) -> Callable[[], Updater]:
    """Returns a factory of fresh device Updaters (each one refreshes once)."""
    counter = iter(range(1000))

    def make() -> Updater:
        home = tmp_path / f"device-{next(counter)}"
        (home / "metadata").mkdir(parents=True)
        fetcher = DirectoryFetcher(
            {METADATA_URL: fleet.metadata_dir, TARGETS_URL: fleet.targets_dir}
        )
        return Updater(
            metadata_dir=str(home / "metadata"),
            metadata_base_url=METADATA_URL,
            target_dir=str(home / "targets"),
            target_base_url=TARGETS_URL,
            fetcher=fetcher,
            bootstrap=(fleet.metadata_dir / "1.root.json").read_bytes(),
        )

    return make


def _bundle(tmp_path: Path, data: bytes = BUNDLE, name: str = "bundle.tar") -> Path:
    path = tmp_path / "incoming" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def _release(fleet: FleetRepository, tmp_path: Path, version: str, data: bytes = BUNDLE) -> int:
    return fleet.add_release(
        "defect",
        version,
        _bundle(tmp_path, data),
        runtime="onnxruntime",
        profiles=["rpi5", "x86"],
        now=_now(),
    )


def _version(fleet: FleetRepository, role: str) -> int:
    document = json.loads((fleet.metadata_dir / f"{role}.json").read_bytes())
    version = document["signed"]["version"]
    assert isinstance(version, int)
    return version


def test_device_gets_its_assignment_and_the_model(
    fleet: FleetRepository, tmp_path: Path, device: Callable[[], Updater]
) -> None:
    assert _release(fleet, tmp_path, "1.0.0") == 1
    model = release_path("defect", "1.0.0")
    fleet.assign("dev-1", model, now=_now())

    updater = device()
    updater.refresh()
    assignment = updater.get_targetinfo("assignments/dev-1")
    assert assignment is not None
    document = json.loads(Path(updater.download_target(assignment)).read_bytes())
    assert document == {"device": "dev-1", "target": model}
    assert updater.get_targetinfo("assignments/dev-2") is None

    info = updater.get_targetinfo(document["target"])
    assert info is not None
    assert info.custom == {
        "release_counter": 1,
        "runtime": "onnxruntime",
        "profiles": ["rpi5", "x86"],
        "model": "defect",
        "version": "1.0.0",
    }
    assert Path(updater.download_target(info)).read_bytes() == BUNDLE


def test_reassignment_reaches_a_device(
    fleet: FleetRepository, tmp_path: Path, device: Callable[[], Updater]
) -> None:
    _release(fleet, tmp_path, "1.0.0")
    _release(fleet, tmp_path, "1.1.0", BUNDLE + b"v2")
    fleet.assign("dev-1", release_path("defect", "1.0.0"), now=_now())
    fleet.assign("dev-1", release_path("defect", "1.1.0"), now=_now())

    updater = device()
    assignment = updater.get_targetinfo("assignments/dev-1")
    assert assignment is not None
    document = json.loads(Path(updater.download_target(assignment)).read_bytes())
    assert document["target"] == release_path("defect", "1.1.0")


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        ("flip-byte", LengthOrHashMismatchError),
        ("truncate", LengthOrHashMismatchError),
        ("append", DownloadLengthMismatchError),
    ],
)
def test_tampered_model_is_refused(
    fleet: FleetRepository,
    tmp_path: Path,
    device: Callable[[], Updater],
    tamper: str,
    error: type[Exception],
) -> None:
    _release(fleet, tmp_path, "1.0.0")
    served = fleet.targets_dir / release_path("defect", "1.0.0")
    data = bytearray(served.read_bytes())
    if tamper == "flip-byte":
        data[len(data) // 2] ^= 0x01
    elif tamper == "truncate":
        del data[-1]
    else:
        data += b"\x00"
    served.write_bytes(bytes(data))

    updater = device()
    info = updater.get_targetinfo(release_path("defect", "1.0.0"))
    assert info is not None
    with pytest.raises(error):
        updater.download_target(info)


EVIL_ASSIGNMENT = json.dumps({"device": "dev-1", "target": "models/evil.tar"}).encode()


def _forge(
    fleet: FleetRepository,
    key_dir: Path,
    role: str,
    signer: Signer,
    *,
    path: str = "assignments/dev-1",
    content: bytes = EVIL_ASSIGNMENT,
) -> None:
    """Add target ``path`` to ``role``'s metadata and re-sign it with ``signer`` alone;
    snapshot and timestamp are re-signed with their real keys."""
    role_file = fleet.metadata_dir / f"{role}.json"
    forged = Metadata[Targets].from_file(str(role_file))
    forged.signed.targets[path] = TargetFile.from_data(path, content)
    forged.signed.version += 1
    forged.sign(signer)
    forged.to_file(str(role_file))

    snapshot = Metadata[Snapshot].from_file(str(fleet.metadata_dir / "snapshot.json"))
    snapshot.signed.meta[f"{role}.json"] = MetaFile(version=forged.signed.version)
    snapshot.signed.version += 1
    snapshot.sign(load_signers(key_dir, "snapshot")[0])
    snapshot.to_file(str(fleet.metadata_dir / "snapshot.json"))

    timestamp = Metadata[Timestamp].from_file(str(fleet.metadata_dir / "timestamp.json"))
    timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
    timestamp.signed.version += 1
    timestamp.sign(load_signers(key_dir, "timestamp")[0])
    timestamp.to_file(str(fleet.metadata_dir / "timestamp.json"))


@pytest.mark.parametrize(
    "key", ["fresh-key", "release-key", "targets-key", "snapshot-key", "timestamp-key"]
)
def test_assignment_signed_outside_the_director_role_is_refused(
    fleet: FleetRepository,
    tmp_path: Path,
    key_dir: Path,
    device: Callable[[], Updater],
    key: str,
) -> None:
    _release(fleet, tmp_path, "1.0.0")
    fleet.assign("dev-1", release_path("defect", "1.0.0"), now=_now())
    signers: dict[str, Callable[[], Signer]] = {
        "fresh-key": CryptoSigner.generate_ed25519,
        "release-key": lambda: load_signers(key_dir, RELEASE_ROLE)[0],
        "targets-key": lambda: load_signers(key_dir, TARGETS_ROLE)[0],
        "snapshot-key": lambda: load_signers(key_dir, "snapshot")[0],
        "timestamp-key": lambda: load_signers(key_dir, "timestamp")[0],
    }
    _forge(fleet, key_dir, DIRECTOR_ROLE, signers[key]())

    updater = device()
    updater.refresh()  # top-level metadata is intact
    with pytest.raises(UnsignedMetadataError):
        updater.get_targetinfo("assignments/dev-1")


def test_forged_director_with_the_director_key_is_accepted(
    fleet: FleetRepository, tmp_path: Path, key_dir: Path, device: Callable[[], Updater]
) -> None:
    """Control for the tests around: only the signing key or the role differs there."""
    _release(fleet, tmp_path, "1.0.0")
    _forge(fleet, key_dir, DIRECTOR_ROLE, load_signers(key_dir, DIRECTOR_ROLE)[0])

    assignment = device().get_targetinfo("assignments/dev-1")
    assert assignment is not None
    assert assignment.length == len(EVIL_ASSIGNMENT)


@pytest.mark.parametrize("assigned", [True, False], ids=["assigned", "unassigned"])
def test_release_key_cannot_sign_an_assignment(
    fleet: FleetRepository,
    tmp_path: Path,
    key_dir: Path,
    device: Callable[[], Updater],
    assigned: bool,
) -> None:
    """The old layout's hole (ADR 6): release.json listing assignments/dev-1 is valid
    release metadata, but the Updater never consults release for that path."""
    _release(fleet, tmp_path, "1.0.0")
    if assigned:
        fleet.assign("dev-1", release_path("defect", "1.0.0"), now=_now())
    _forge(fleet, key_dir, RELEASE_ROLE, load_signers(key_dir, RELEASE_ROLE)[0])

    updater = device()
    updater.refresh()
    assignment = updater.get_targetinfo("assignments/dev-1")
    if not assigned:
        assert assignment is None
        return
    assert assignment is not None
    document = json.loads(Path(updater.download_target(assignment)).read_bytes())
    assert document == {"device": "dev-1", "target": release_path("defect", "1.0.0")}


def test_release_key_cannot_sign_the_top_level_targets(
    fleet: FleetRepository, tmp_path: Path, key_dir: Path, device: Callable[[], Updater]
) -> None:
    """Where the release role used to live: top-level targets.json now needs its own
    offline key, so the release key's signature there is refused outright."""
    _release(fleet, tmp_path, "1.0.0")
    _forge(fleet, key_dir, TARGETS_ROLE, load_signers(key_dir, RELEASE_ROLE)[0])

    with pytest.raises(UnsignedMetadataError):
        device().refresh()


@pytest.mark.parametrize("released", [True, False], ids=["released", "unreleased"])
def test_director_key_cannot_sign_a_model(
    fleet: FleetRepository,
    tmp_path: Path,
    key_dir: Path,
    device: Callable[[], Updater],
    released: bool,
) -> None:
    """A stolen director key can list models/... in director.json; the Updater only ever
    takes models/* from the release role."""
    version = "1.0.0" if released else "6.6.6"
    _release(fleet, tmp_path, "1.0.0")
    path = release_path("defect", version)
    _forge(
        fleet,
        key_dir,
        DIRECTOR_ROLE,
        load_signers(key_dir, DIRECTOR_ROLE)[0],
        path=path,
        content=b"evil",
    )

    updater = device()
    updater.refresh()
    info = updater.get_targetinfo(path)
    if not released:
        assert info is None
        return
    assert info is not None
    assert info.length == len(BUNDLE)
    assert Path(updater.download_target(info)).read_bytes() == BUNDLE


def test_concurrent_writers_keep_snapshot_and_timestamp_consistent(
    fleet: FleetRepository, tmp_path: Path, device: Callable[[], Updater]
) -> None:
    """A server re-signing timestamp while an operator assigns (the flock on the metadata
    directory): the timestamp must always name the snapshot that is published."""
    _release(fleet, tmp_path, "1.0.0")
    done = threading.Event()

    def resign() -> None:
        while not done.is_set():
            fleet.refresh_timestamp(now=_now())

    thread = threading.Thread(target=resign)
    thread.start()
    try:
        for index in range(5):
            fleet.assign(f"dev-{index}", release_path("defect", "1.0.0"), now=_now())
    finally:
        done.set()
        thread.join()
    timestamp = json.loads((fleet.metadata_dir / "timestamp.json").read_bytes())
    assert timestamp["signed"]["meta"]["snapshot.json"]["version"] == _version(fleet, "snapshot")
    assert _version(fleet, "snapshot") == 7  # 1 + one release + five assignments
    assert device().get_targetinfo("assignments/dev-4") is not None


@pytest.mark.parametrize("role", ["targets", "release", "director", "snapshot", "timestamp"])
def test_resign_bumps_the_role_and_what_follows(
    fleet: FleetRepository, device: Callable[[], Updater], role: str
) -> None:
    roles = ["targets", "release", "director", "snapshot", "timestamp"]
    before = {name: _version(fleet, name) for name in roles}
    later = _now() + timedelta(days=2)
    fleet.resign(role, now=later)
    follows = {"snapshot": ["snapshot", "timestamp"], "timestamp": ["timestamp"]}
    changed = follows.get(role, [role, "snapshot", "timestamp"])
    after = {name: _version(fleet, name) for name in roles}
    assert after == {name: before[name] + (name in changed) for name in roles}
    lifetime = fleet.policy.lifetime(role)
    assert fleet.expires(role) == (later + lifetime).replace(microsecond=0)
    device().refresh()


def test_resign_refuses_root_and_unknown_roles(fleet: FleetRepository) -> None:
    for role in ("root", "nope"):
        with pytest.raises(RepositoryError, match="cannot re-sign"):
            fleet.resign(role, now=_now())


def test_release_counter_grows_per_model(fleet: FleetRepository, tmp_path: Path) -> None:
    assert _release(fleet, tmp_path, "1.0.0", b"one") == 1
    assert _release(fleet, tmp_path, "1.1.0", b"two") == 2
    other = fleet.add_release(
        "scratch", "1.0.0", _bundle(tmp_path, b"s"), runtime="litert", profiles=[], now=_now()
    )
    assert other == 1
    before = _version(fleet, RELEASE_ROLE)
    # The same release again is a no-op that keeps its counter.
    assert _release(fleet, tmp_path, "1.0.0", b"one") == 1
    assert _version(fleet, RELEASE_ROLE) == before
    # A lower version string released later still gets a higher counter.
    assert _release(fleet, tmp_path, "0.9.0", b"late") == 3


@pytest.mark.parametrize(
    "change",
    [{"data": b"other bytes"}, {"runtime": "litert"}, {"profiles": ["jetson"]}],
    ids=["bytes", "runtime", "profiles"],
)
def test_rerelease_with_different_content_is_refused(
    fleet: FleetRepository, tmp_path: Path, change: dict[str, object]
) -> None:
    _release(fleet, tmp_path, "1.0.0")
    before = _version(fleet, RELEASE_ROLE)
    data = change.get("data", BUNDLE)
    runtime = change.get("runtime", "onnxruntime")
    profiles = change.get("profiles", ["rpi5", "x86"])
    assert isinstance(data, bytes)
    assert isinstance(runtime, str)
    assert isinstance(profiles, list)
    with pytest.raises(RepositoryError, match="already released"):
        fleet.add_release(
            "defect",
            "1.0.0",
            _bundle(tmp_path, data),
            runtime=runtime,
            profiles=profiles,
            now=_now(),
        )
    assert _version(fleet, RELEASE_ROLE) == before
    assert (fleet.targets_dir / release_path("defect", "1.0.0")).read_bytes() == BUNDLE
    assert not list((fleet.targets_dir / "models").glob(".staging-*"))


@pytest.mark.parametrize(
    ("device_id", "target"),
    [
        ("dev-1", "models/defect-9.9.9.tar"),
        ("dev-1", "assignments/dev-2"),
        ("a/b", "models/defect-1.0.0.tar"),
        ("", "models/defect-1.0.0.tar"),
    ],
    ids=["unreleased", "not-a-model", "slash-in-id", "empty-id"],
)
def test_assign_refuses_bad_input(
    fleet: FleetRepository, tmp_path: Path, device_id: str, target: str
) -> None:
    _release(fleet, tmp_path, "1.0.0")
    before = _version(fleet, DIRECTOR_ROLE)
    with pytest.raises(RepositoryError):
        fleet.assign(device_id, target, now=_now())
    assert _version(fleet, DIRECTOR_ROLE) == before


def test_expired_timestamp_is_refused(
    fleet: FleetRepository, device: Callable[[], Updater]
) -> None:
    fleet.refresh_timestamp(now=_now() - timedelta(days=2))
    with pytest.raises(ExpiredMetadataError):
        device().refresh()

    fleet.refresh_timestamp(now=_now())
    device().refresh()


def test_metadata_lifetimes(fleet: FleetRepository) -> None:
    now = _now()
    expected = {
        "root": 365,
        "targets": 365,
        "release": 30,
        "director": 30,
        "snapshot": 7,
        "timestamp": 1,
    }
    for role, days in expected.items():
        document = json.loads((fleet.metadata_dir / f"{role}.json").read_bytes())
        expires = datetime.fromisoformat(document["signed"]["expires"].replace("Z", "+00:00"))
        assert abs(expires - (now + timedelta(days=days))) < timedelta(minutes=1), role


def test_root_is_two_of_three_and_signed_by_two(fleet: FleetRepository) -> None:
    root = json.loads((fleet.metadata_dir / "1.root.json").read_bytes())
    assert root["signed"]["roles"]["root"]["threshold"] == 2
    assert len(root["signed"]["roles"]["root"]["keyids"]) == 3
    assert len(root["signatures"]) == 2
    assert root["signed"]["consistent_snapshot"] is False
    root_roles = root["signed"]["roles"]
    assert set(root_roles) == {"root", "targets", "snapshot", "timestamp"}
    # Every top-level role has its own key.
    keyids = [k for role in root_roles.values() for k in role["keyids"]]
    assert len(keyids) == len(set(keyids)) == 6


def test_top_level_targets_only_delegates(fleet: FleetRepository, tmp_path: Path) -> None:
    _release(fleet, tmp_path, "1.0.0")
    fleet.assign("dev-1", release_path("defect", "1.0.0"), now=_now())
    targets = json.loads((fleet.metadata_dir / "targets.json").read_bytes())["signed"]
    assert targets["targets"] == {}
    assert targets["version"] == 1  # offline: releases and assignments never touch it
    delegations = targets["delegations"]
    roles = {role["name"]: role for role in delegations["roles"]}
    assert roles[RELEASE_ROLE]["paths"] == ["models/*"]
    assert roles[DIRECTOR_ROLE]["paths"] == ["assignments/*"]
    assert all(role["terminating"] and role["threshold"] == 1 for role in roles.values())
    assert set(roles[RELEASE_ROLE]["keyids"]).isdisjoint(roles[DIRECTOR_ROLE]["keyids"])
    assert set(delegations["keys"]) == {
        *roles[RELEASE_ROLE]["keyids"],
        *roles[DIRECTOR_ROLE]["keyids"],
    }

    release = json.loads((fleet.metadata_dir / "release.json").read_bytes())["signed"]
    assert list(release["targets"]) == [release_path("defect", "1.0.0")]
    director = json.loads((fleet.metadata_dir / "director.json").read_bytes())["signed"]
    assert list(director["targets"]) == ["assignments/dev-1"]
    snapshot = json.loads((fleet.metadata_dir / "snapshot.json").read_bytes())["signed"]
    assert {name: meta["version"] for name, meta in snapshot["meta"].items()} == {
        "targets.json": 1,
        "release.json": 2,
        "director.json": 2,
    }


def test_refresh_expiring_resigns_what_is_due(tmp_path: Path, key_dir: Path) -> None:
    policy = ExpiryPolicy()
    fleet = FleetRepository(tmp_path / "m", key_dir, tmp_path / "t", policy)
    start = _now()
    fleet.create(now=start)
    assert fleet.refresh_expiring(now=start + policy.timestamp / 2 - timedelta(minutes=1)) == []
    assert fleet.timestamp_state()[0] == 1

    later = start + policy.timestamp / 2 + timedelta(minutes=1)
    assert fleet.refresh_expiring(now=later) == ["timestamp"]
    assert fleet.timestamp_state() == (2, later.replace(microsecond=0) + policy.timestamp)
    assert fleet.refresh_expiring(now=start + policy.snapshot) == ["snapshot", "timestamp"]
    assert fleet.refresh_expiring(now=start + policy.director) == [
        DIRECTOR_ROLE,
        "snapshot",
        "timestamp",
    ]
    assert _version(fleet, DIRECTOR_ROLE) == 2
    assert fleet.timestamp_state()[0] == 4


def test_private_keys_stay_private(fleet: FleetRepository, key_dir: Path) -> None:
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    key_files = sorted(key_dir.iterdir())
    assert [p.name for p in key_files] == [
        "director-1.pem",
        "release-1.pem",
        "root-1.pem",
        "root-2.pem",
        "root-3.pem",
        "snapshot-1.pem",
        "targets-1.pem",
        "timestamp-1.pem",
    ]
    for path in key_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert b"PRIVATE KEY" in path.read_bytes()

    published = [p for d in (fleet.metadata_dir, fleet.targets_dir) for p in d.rglob("*")]
    assert any(p.name == "root.json" for p in published)
    for path in published:
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_init_keys_refuses_a_non_empty_dir(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "notes.txt").write_text("hello")
    with pytest.raises(RepositoryError, match="not empty"):
        init_keys(keys)
    assert [p.name for p in keys.iterdir()] == ["notes.txt"]


def test_repository_refuses_keys_inside_published_dirs(tmp_path: Path) -> None:
    init_keys(tmp_path / "metadata" / "keys")
    with pytest.raises(RepositoryError, match="must not overlap"):
        FleetRepository(tmp_path / "metadata", tmp_path / "metadata" / "keys", tmp_path / "t")


def test_create_refuses_an_existing_repository(fleet: FleetRepository) -> None:
    with pytest.raises(RepositoryError, match="already exists"):
        fleet.create(now=_now())


def test_fetcher_serves_nothing_outside_its_dirs(fleet: FleetRepository) -> None:
    fetcher = DirectoryFetcher({METADATA_URL: fleet.metadata_dir})
    with pytest.raises(DownloadError):
        fetcher.download_bytes(f"{METADATA_URL}../targets/x", 1000)
    with pytest.raises(DownloadHTTPError):
        fetcher.download_bytes(f"{METADATA_URL}nope.json", 1000)
