"""``fleet-server``: the real entry point (subprocess) for keys, release, assign and errors;
``FleetPublisher`` in-process against a real Mosquitto for notify, fetch and re-signing."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edge_agent.bundle import seal_bundle
from edge_agent.protocol import topics
from edge_agent.protocol.notify import decode_notify
from edge_agent.transport import MqttTransport
from edge_agent.update.mqtt_fetcher import MqttFetcher
from edge_agent.update.unpack import pack_bundle
from fleet_server.cli import main
from fleet_server.repository import FleetRepository, init_keys, release_path
from fleet_server.serve import FleetPublisher
from fleet_server.workers.chunk_server import ChunkServer
from tests.mqtt_broker import MosquittoBroker, connect, mosquitto_broker  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
ONNX_BUNDLE = ROOT / "models" / "reference-onnx"
TFLITE_BUNDLE = ROOT / "models" / "reference-tflite"
FLEET_SERVER = Path(sys.executable).with_name("fleet-server")
ALL_ONNX = "jetson-nano,jetson-orin-nano,rpi4,rpi5,x86-generic"
DEVICE = "dev-1"
_ROLES = ("targets", "release", "director", "snapshot", "timestamp")


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGE_AGENT_PROFILES": str(ROOT / "firmware_profiles")}
    return subprocess.run(
        [str(FLEET_SERVER), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def _ok(*args: str | Path) -> str:
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _version(metadata: Path, role: str) -> int:
    version = json.loads((metadata / f"{role}.json").read_bytes())["signed"]["version"]
    assert isinstance(version, int)
    return version


@dataclass
class Dirs:
    keys: Path
    repo: Path

    @property
    def metadata(self) -> Path:
        return self.repo / "metadata"

    @property
    def targets(self) -> Path:
        return self.repo / "targets"

    def args(self) -> list[str | Path]:
        return ["--repo", self.repo, "--keys", self.keys]


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    """Keys and a fresh repository, made in-process (the subprocess tests make their own)."""
    made = Dirs(tmp_path / "keys", tmp_path / "repo")
    assert main(["keys", "init", "--keys", str(made.keys), "--repo", str(made.repo)]) == 0
    return made


def _bundle_version(tmp_path: Path, source: Path, version: str) -> Path:
    """A copy of ``source`` re-sealed as another version (same files, new manifest)."""
    copy = tmp_path / f"{source.name}-{version}"
    shutil.copytree(source, copy)
    draft = json.loads((copy / "bundle.json").read_bytes())
    del draft["files"]
    draft["version"] = version
    seal_bundle(copy, draft)
    return copy


# -- keys and repository -----------------------------------------------------------------


def test_keys_init_with_repo_creates_private_keys_and_version_1(tmp_path: Path) -> None:
    keys, repo = tmp_path / "keys", tmp_path / "repo"
    out = _ok("keys", "init", "--keys", keys, "--repo", repo)
    assert f"{repo / 'metadata' / '1.root.json'}" in out

    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    names = sorted(p.name for p in keys.iterdir())
    assert names == [
        "director-1.pem",
        "release-1.pem",
        "root-1.pem",
        "root-2.pem",
        "root-3.pem",
        "snapshot-1.pem",
        "targets-1.pem",
        "timestamp-1.pem",
    ]
    for path in keys.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    published = sorted(p.name for p in (repo / "metadata").iterdir())
    assert published == [
        "1.root.json",
        "director.json",
        "release.json",
        "root.json",
        "snapshot.json",
        "targets.json",
        "timestamp.json",
    ]
    assert (repo / "targets").is_dir()
    assert all(_version(repo / "metadata", role) == 1 for role in ("targets", "timestamp"))


def test_repo_init_after_keys_init_and_never_twice(tmp_path: Path) -> None:
    keys, repo = tmp_path / "keys", tmp_path / "repo"
    _ok("keys", "init", "--keys", keys)
    assert not repo.exists()
    out = _ok("repo", "init", "--keys", keys, "--repo", repo)
    assert f"{repo / 'metadata' / '1.root.json'}" in out
    before = (repo / "metadata" / "1.root.json").read_bytes()

    again = _run("repo", "init", "--keys", keys, "--repo", repo)
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert "Traceback" not in again.stderr
    assert (repo / "metadata" / "1.root.json").read_bytes() == before


# -- release and assign ------------------------------------------------------------------


def test_release_is_idempotent_and_a_new_version_counts_up(tmp_path: Path, dirs: Dirs) -> None:
    target = release_path("reference-onnx", "1.0.0")
    first = _ok("release", ONNX_BUNDLE, *dirs.args())
    assert first.split() == [
        "released",
        target,
        "release_counter=1",
        "runtime=onnx",
        f"profiles={ALL_ONNX}",
    ]
    versions = {role: _version(dirs.metadata, role) for role in ("release", "timestamp")}
    assert _ok("release", ONNX_BUNDLE, *dirs.args()) == first
    assert {role: _version(dirs.metadata, role) for role in versions} == versions

    # The published artifact is the deterministic tar of the bundle, listed with its fields.
    pack_bundle(ONNX_BUNDLE, tmp_path / "expected.tar")
    assert (dirs.targets / target).read_bytes() == (tmp_path / "expected.tar").read_bytes()
    listed = json.loads((dirs.metadata / "release.json").read_bytes())["signed"]["targets"]
    assert listed[target]["custom"] == {
        "release_counter": 1,
        "runtime": "onnx",
        "profiles": ALL_ONNX.split(","),
        "model": "reference-onnx",
        "version": "1.0.0",
    }

    newer = _bundle_version(tmp_path, ONNX_BUNDLE, "1.1.0")
    out = _ok("release", newer, *dirs.args(), "--profiles", "rpi5,rpi4")
    assert out.split()[1:3] == [release_path("reference-onnx", "1.1.0"), "release_counter=2"]
    assert out.split()[-1] == "profiles=rpi4,rpi5"
    # Another model has its own counter.
    assert "release_counter=1" in _ok("release", TFLITE_BUNDLE, *dirs.args())


def test_assign_checks_the_device_profile(dirs: Dirs) -> None:
    _ok("release", TFLITE_BUNDLE, *dirs.args())
    _ok("release", ONNX_BUNDLE, *dirs.args(), "--profiles", "rpi5")
    director = (dirs.metadata / "director.json").read_bytes()

    # jetson-nano has no tflite runtime, so the tflite release is not for it.
    refused = _run(
        "assign", DEVICE, "reference-tflite@1.0.0", *dirs.args(), "--profile", "jetson-nano"
    )
    assert refused.returncode == 2
    assert "jetson-nano" in refused.stderr
    assert refused.stderr.startswith("fleet-server: error:")
    assert "Traceback" not in refused.stderr
    # rpi4 runs onnx, but the release was narrowed to rpi5.
    refused = _run("assign", DEVICE, "reference-onnx@1.0.0", *dirs.args(), "--profile", "rpi4")
    assert refused.returncode == 2
    assert "rpi4" in refused.stderr
    assert (dirs.metadata / "director.json").read_bytes() == director
    assert not (dirs.targets / "assignments").exists()

    out = _ok("assign", DEVICE, "reference-onnx@1.0.0", *dirs.args(), "--profile", "rpi5")
    target = release_path("reference-onnx", "1.0.0")
    assert out.strip() == f"assigned assignments/{DEVICE} -> {target}"
    document = json.loads((dirs.targets / "assignments" / DEVICE).read_bytes())
    assert document == {"device": DEVICE, "target": target}
    assert _version(dirs.metadata, "director") == 2


def _tamper_bundle(tmp_path: Path) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(ONNX_BUNDLE, copy)
    (copy / "golden" / "dent.png").write_bytes(b"not the released image")
    return copy


def _break_key(dirs: Dirs) -> None:
    (dirs.keys / "release-1.pem").write_bytes(b"garbage")


@pytest.mark.parametrize(
    "case",
    [
        (["release", "{tmp}/tampered", "{dirs}"], "tamper", "golden/dent.png"),
        (["release", "{tmp}/nothing", "{dirs}"], None, "nothing: not a bundle directory"),
        (["release", str(ONNX_BUNDLE), "{dirs}", "--profiles", "rpi9"], None, "'rpi9'"),
        (
            ["release", str(TFLITE_BUNDLE), "{dirs}", "--profiles", "jetson-nano"],
            None,
            "'jetson-nano'",
        ),
        (["release", str(ONNX_BUNDLE), "{dirs}"], "break-key", "release-1.pem"),
        (
            ["assign", DEVICE, "reference-onnx", "{dirs}", "--profile", "rpi5"],
            None,
            "MODEL@VERSION",
        ),
        (
            ["assign", DEVICE, "reference-onnx@9.9", "{dirs}", "--profile", "rpi5"],
            None,
            "not released",
        ),
        (["assign", "dev/1", "reference-onnx@1.0.0", "{dirs}", "--profile", "rpi5"], None, "dev/1"),
        (["assign", DEVICE, "reference-onnx@1.0.0", "{dirs}", "--profile", "rpi9"], None, "'rpi9'"),
        (["repo", "init", "--repo", "{tmp}/repo2", "--keys", "{tmp}/nokeys"], None, "nokeys"),
        (["release", str(ONNX_BUNDLE), "--repo", "{tmp}", "--keys", "{tmp}/keys"], None, "overlap"),
        (["serve", "{dirs}", "--broker", "localhost"], None, "HOST:PORT"),
        (["serve", "{dirs}", "--broker", "h:1", "--tls-ca", "{tmp}/ca.pem"], None, "--tls-cert"),
    ],
    ids=[
        "tampered-bundle",
        "no-bundle",
        "unknown-profile",
        "profile-lacks-runtime",
        "bad-key-file",
        "no-version",
        "unreleased",
        "bad-device-id",
        "unknown-device-profile",
        "no-keys",
        "keys-inside-repo",
        "bad-broker",
        "partial-tls",
    ],
)
def test_user_errors_exit_2_with_a_named_culprit(
    tmp_path: Path,
    dirs: Dirs,
    capsys: pytest.CaptureFixture[str],
    case: tuple[list[str], str | None, str],
) -> None:
    args, setup, message = case
    main(["release", str(ONNX_BUNDLE), *map(str, dirs.args())])
    capsys.readouterr()
    if setup == "tamper":
        _tamper_bundle(tmp_path)
    elif setup == "break-key":
        _break_key(dirs)
    argv: list[str] = []
    for arg in args:
        if arg == "{dirs}":
            argv += map(str, dirs.args())
        else:
            argv.append(arg.replace("{tmp}", str(tmp_path)))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fleet-server: error:"), err
    assert message in err
    assert err.count("\n") == 1


def test_resign_release(dirs: Dirs, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resign", "release", *map(str, dirs.args())]) == 0
    assert capsys.readouterr().out.startswith("re-signed release.json: expires ")
    assert _version(dirs.metadata, "release") == 2
    assert _version(dirs.metadata, "timestamp") == 2
    with pytest.raises(SystemExit) as caught:
        main(["resign", "root", *map(str, dirs.args())])
    assert caught.value.code == 2
    assert "invalid choice: 'root'" in capsys.readouterr().err


def test_an_error_through_the_entry_point_has_no_traceback(tmp_path: Path) -> None:
    result = _run(
        "release", tmp_path / "missing-bundle", "--repo", tmp_path / "r", "--keys", tmp_path / "k"
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("fleet-server: error:")
    assert "missing-bundle" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_subcommand_has_help() -> None:
    commands = (["keys", "init"], ["repo", "init"], ["release"], ["assign"], ["resign"], ["serve"])
    for command in commands:
        out = _ok(*command, "--help")
        assert "usage: fleet-server" in out
        assert "--keys" in out


# -- serving: notify, fetch, re-sign ------------------------------------------------------


class Clock:
    """An injectable clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Served:
    dirs: Dirs
    repo: FleetRepository
    publisher: FleetPublisher
    clock: Clock
    notifies: queue.Queue[int]
    device: MqttTransport


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def served(mosquitto: MosquittoBroker, tmp_path: Path) -> Iterator[Served]:
    """A repository created at the real time, served by a running FleetPublisher with a
    hand-moved clock; a device transport subscribed to notify after the first one."""
    start = datetime.now(timezone.utc)
    dirs = Dirs(tmp_path / "keys", tmp_path / "repo")
    init_keys(dirs.keys)
    repo = FleetRepository(dirs.metadata, dirs.keys, dirs.targets)
    repo.create(now=start)
    clock = Clock(start)
    server = connect(mosquitto, "fleet-server")
    ChunkServer(server, dirs.metadata, dirs.targets)
    publisher = FleetPublisher(
        server, repo, clock=clock, poll_interval_s=0.02, refresh_interval_s=0.02
    )
    stop = threading.Event()
    thread = threading.Thread(target=publisher.run, args=(stop,), daemon=True)
    thread.start()
    device = None
    try:
        _wait_for(lambda: publisher.announced_version == 1)
        # Subscribing after the publish: only a retained notify can reach this device.
        device = connect(mosquitto, DEVICE)
        notifies: queue.Queue[int] = queue.Queue()
        device.subscribe(topics.NOTIFY, lambda _t, payload: notifies.put(decode_notify(payload)))
        yield Served(dirs, repo, publisher, clock, notifies, device)
    finally:
        stop.set()
        thread.join(timeout=5)
        if device is not None:
            device.stop()
        server.stop()
    assert not thread.is_alive()


def test_notify_is_retained_and_follows_new_metadata(served: Served, tmp_path: Path) -> None:
    assert served.notifies.get(timeout=5) == 1

    tar = tmp_path / "bundle.tar"
    pack_bundle(ONNX_BUNDLE, tar)
    served.repo.add_release(
        "reference-onnx", "1.0.0", tar, runtime="onnx", profiles=["rpi5"], now=served.clock()
    )
    assert served.notifies.get(timeout=5) == 2
    served.repo.assign(DEVICE, release_path("reference-onnx", "1.0.0"), now=served.clock())
    assert served.notifies.get(timeout=5) == 3
    assert served.repo.timestamp_state()[0] == 3


def test_notify_is_published_again_after_a_broker_restart(
    served: Served, mosquitto: MosquittoBroker
) -> None:
    assert served.notifies.get(timeout=5) == 1
    mosquitto.restart()  # no persistence: the retained notify is gone
    # Both transports reconnect by themselves; the device subscribes again and gets the
    # notify the server publishes once it is back.
    assert served.notifies.get(timeout=15) == 1
    assert served.publisher.announced_version == 1


def test_fetch_of_the_timestamp_is_answered(served: Served) -> None:
    fetcher = MqttFetcher(served.device, DEVICE, request_timeout_s=0.2, retries=25)
    data = fetcher.download_bytes("mqtt:metadata/timestamp.json", 16_384)
    assert data == (served.dirs.metadata / "timestamp.json").read_bytes()
    root = fetcher.download_bytes("mqtt:metadata/1.root.json", 512_000)
    assert root == (served.dirs.metadata / "1.root.json").read_bytes()


def test_replaced_metadata_is_not_served_from_a_stale_cache(served: Served) -> None:
    """A re-signed timestamp.json often has the old one's size and mtime; a new inode
    still makes it a new file for the chunk server's cache."""
    fetcher = MqttFetcher(served.device, DEVICE, request_timeout_s=0.2, retries=25)
    path = served.dirs.metadata / "timestamp.json"
    old = fetcher.download_bytes("mqtt:metadata/timestamp.json", 16_384)
    assert old == path.read_bytes()
    mtime_ns = path.stat().st_mtime_ns
    replacement = path.with_name("replacement.tmp")
    replacement.write_bytes(old.replace(b'"version"', b'"versi0n"'))
    os.utime(replacement, ns=(mtime_ns, mtime_ns))
    os.replace(replacement, path)
    assert path.stat().st_size == len(old)
    assert path.stat().st_mtime_ns == mtime_ns

    new = fetcher.download_bytes("mqtt:metadata/timestamp.json", 16_384)
    assert new == path.read_bytes() != old
    # The publisher cannot read that file: it says so and keeps running.
    _wait_for(lambda: served.publisher.last_warning is not None)
    assert "timestamp.json is not valid timestamp metadata" in str(served.publisher.last_warning)


def test_timestamp_is_resigned_once_half_its_lifetime_has_passed(served: Served) -> None:
    assert served.notifies.get(timeout=5) == 1
    lifetime = served.repo.policy.timestamp
    start = served.clock.now
    _, expires = served.repo.timestamp_state()

    served.clock.now = start + lifetime / 2 - timedelta(minutes=5)
    time.sleep(0.3)  # many refresh checks at the 0.02 s interval
    assert served.repo.timestamp_state() == (1, expires)
    assert served.notifies.empty()

    served.clock.now = start + lifetime / 2 + timedelta(minutes=5)
    assert served.notifies.get(timeout=5) == 2
    version, new_expires = served.repo.timestamp_state()
    assert version == 2
    assert new_expires == (served.clock.now + lifetime).replace(microsecond=0)
    # Only the timestamp was due: snapshot and director stay at version 1.
    assert _version(served.dirs.metadata, "snapshot") == 1
    assert _version(served.dirs.metadata, "director") == 1

    time.sleep(0.3)  # the new timestamp is fresh: no further re-sign at the same time
    assert served.repo.timestamp_state()[0] == 2


def test_online_roles_are_resigned_and_offline_ones_reported(served: Served) -> None:
    assert served.notifies.get(timeout=5) == 1
    served.clock.now += served.repo.policy.release / 2 + timedelta(hours=1)
    assert served.notifies.get(timeout=5) == 2
    assert {role: _version(served.dirs.metadata, role) for role in _ROLES} == {
        "targets": 1,
        "release": 1,
        "director": 2,
        "snapshot": 2,
        "timestamp": 2,
    }
    _wait_for(lambda: "release.json expires" in str(served.publisher.last_warning))
    assert "fleet-server resign release" in str(served.publisher.last_warning)


def test_serve_entry_point_notifies_and_stops_on_sigterm(
    mosquitto: MosquittoBroker, dirs: Dirs
) -> None:
    listener = connect(mosquitto, "listener")
    notifies: queue.Queue[bytes] = queue.Queue()
    listener.subscribe(topics.NOTIFY, lambda _t, payload: notifies.put(payload))
    broker = f"{mosquitto.host}:{mosquitto.port}"
    proc = subprocess.Popen(
        [str(FLEET_SERVER), "serve", *map(str, dirs.args()), "--broker", broker],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert notifies.get(timeout=15) == b'{"timestamp_version":1}'
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
        listener.stop()
    assert proc.returncode == 0, stderr
    assert "notify: timestamp version 1" in stderr
    assert "WARNING" not in stderr
    assert "SIGTERM: stopping" in stderr
    assert "Traceback" not in stderr
