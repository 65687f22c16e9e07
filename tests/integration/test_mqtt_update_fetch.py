"""TUF updates over MQTT: a real Updater with `MqttFetcher`, a real Mosquitto, a real
`ChunkServer` serving a real `FleetRepository`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from tuf.api.exceptions import (
    DownloadError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    LengthOrHashMismatchError,
)
from tuf.ngclient.updater import Updater

from edge_agent.protocol import topics
from edge_agent.protocol.fetch_wire import CHUNK_SIZE, decode_answer
from edge_agent.transport import MqttTransport
from edge_agent.update.mqtt_fetcher import MqttFetcher
from fleet_server.repository import FleetRepository, init_keys, release_path
from fleet_server.workers.chunk_server import ChunkServer
from tests.mqtt_broker import MosquittoBroker, connect, mosquitto_broker  # noqa: F401

DEVICE = "dev-1"
MODEL = release_path("defect", "1.0.0")
BUNDLE = os.urandom(300 * 1024 + 123)


@dataclass
class Fleet:
    repo: FleetRepository
    server: ChunkServer
    server_transport: MqttTransport
    device_transport: MqttTransport
    make_updater: Callable[[], Updater]


def _now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture
def repo(tmp_path: Path) -> FleetRepository:
    init_keys(tmp_path / "keys")
    repo = FleetRepository(
        tmp_path / "published" / "metadata", tmp_path / "keys", tmp_path / "published" / "targets"
    )
    repo.create(now=_now())
    bundle = tmp_path / "incoming.tar"
    bundle.write_bytes(BUNDLE)
    repo.add_release("defect", "1.0.0", bundle, runtime="onnxruntime", profiles=["x86"], now=_now())
    repo.assign(DEVICE, MODEL, now=_now())
    return repo


@pytest.fixture
def fleet(mosquitto: MosquittoBroker, repo: FleetRepository, tmp_path: Path) -> Iterator[Fleet]:
    server_transport = connect(mosquitto, "fleet-server")
    device_transport = connect(mosquitto, DEVICE)
    server = ChunkServer(server_transport, repo.metadata_dir, repo.targets_dir)
    # The server's SUBSCRIBE travels on another connection than the device's requests:
    # wait until it is in place, or the first request may be lost and wait for a retry.
    probe = MqttFetcher(device_transport, DEVICE, request_timeout_s=0.1, retries=50)
    probe.download_bytes("mqtt:metadata/1.root.json", 512_000)
    homes = iter(range(100))

    def make_updater() -> Updater:
        home = tmp_path / f"device-{next(homes)}"
        (home / "metadata").mkdir(parents=True)
        (home / "targets").mkdir()
        return Updater(
            metadata_dir=str(home / "metadata"),
            metadata_base_url="mqtt:metadata/",
            target_dir=str(home / "targets"),
            target_base_url="mqtt:targets/",
            fetcher=MqttFetcher(device_transport, DEVICE),
            bootstrap=(repo.metadata_dir / "1.root.json").read_bytes(),
        )

    try:
        yield Fleet(repo, server, server_transport, device_transport, make_updater)
    finally:
        device_transport.stop()
        server_transport.stop()


def _assigned_model(updater: Updater) -> str:
    updater.refresh()
    assignment = updater.get_targetinfo(f"assignments/{DEVICE}")
    assert assignment is not None
    document = json.loads(Path(updater.download_target(assignment)).read_bytes())
    assert document == {"device": DEVICE, "target": MODEL}
    target: str = document["target"]
    return target


def test_device_downloads_its_assigned_model_over_mqtt(fleet: Fleet) -> None:
    updater = fleet.make_updater()
    info = updater.get_targetinfo(_assigned_model(updater))
    assert info is not None
    assert Path(updater.download_target(info)).read_bytes() == BUNDLE

    # A second device gets the same bundle from the cache: one disk read per file.
    reads = fleet.server.reads_from_disk
    other = fleet.make_updater()
    other_info = other.get_targetinfo(_assigned_model(other))
    assert other_info is not None
    assert Path(other.download_target(other_info)).read_bytes() == BUNDLE
    assert fleet.server.reads_from_disk == reads


def test_missing_metadata_version_is_a_404_and_refresh_succeeds(fleet: Fleet) -> None:
    fetcher = MqttFetcher(fleet.device_transport, DEVICE)
    with pytest.raises(DownloadHTTPError) as caught:
        fetcher.download_bytes("mqtt:metadata/2.root.json", 512_000)
    assert caught.value.status_code == 404
    fleet.make_updater().refresh()  # probes 2.root.json, gets not_found, carries on


def test_tampered_bundle_is_refused(fleet: Fleet) -> None:
    served = fleet.repo.targets_dir / MODEL
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0x01
    served.write_bytes(bytes(data))
    updater = fleet.make_updater()
    info = updater.get_targetinfo(_assigned_model(updater))
    assert info is not None
    with pytest.raises(LengthOrHashMismatchError):
        updater.download_target(info)


def test_server_streaming_past_the_signed_length_is_cut_at_the_cap(fleet: Fleet) -> None:
    served = fleet.repo.targets_dir / MODEL
    served.write_bytes(BUNDLE + os.urandom(4 * CHUNK_SIZE))
    updater = fleet.make_updater()
    info = updater.get_targetinfo(_assigned_model(updater))
    assert info is not None
    before = fleet.server.requests_served
    with pytest.raises(DownloadLengthMismatchError):
        updater.download_target(info)
    # The fetcher stopped asking as soon as the cap was passed ...
    assert fleet.server.requests_served - before == info.length // CHUNK_SIZE + 1
    # ... and nothing longer than signed reached the device's target directory.
    target_dir = Path(updater.target_dir)  # type: ignore[arg-type]
    assert all(p.stat().st_size <= info.length for p in target_dir.rglob("*") if p.is_file())
    assert not any(p.stat().st_size == len(BUNDLE) for p in target_dir.rglob("*"))


def test_no_server_fails_after_retries_in_bounded_time(mosquitto: MosquittoBroker) -> None:
    transport = connect(mosquitto, DEVICE)
    try:
        fetcher = MqttFetcher(transport, DEVICE, request_timeout_s=0.2, retries=2)
        started = time.monotonic()
        with pytest.raises(DownloadError) as caught:
            fetcher.download_bytes("mqtt:metadata/timestamp.json", 16_384)
        elapsed = time.monotonic() - started
        assert not isinstance(caught.value, DownloadHTTPError)
        assert "3 attempts" in str(caught.value)
        assert 0.55 < elapsed < 2.0

        # The whole-file deadline cuts retries short.
        fetcher = MqttFetcher(
            transport, DEVICE, request_timeout_s=0.2, retries=50, min_deadline_s=0.5
        )
        started = time.monotonic()
        with pytest.raises(DownloadError, match="deadline"):
            fetcher.download_bytes("mqtt:metadata/timestamp.json", 16_384)
        assert time.monotonic() - started < 1.5
    finally:
        transport.stop()


def test_server_refuses_symlinks_and_bad_requests(fleet: Fleet, tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (fleet.repo.targets_dir / "link").symlink_to(secret)
    (fleet.repo.metadata_dir / "link.json").symlink_to(secret)
    fetcher = MqttFetcher(fleet.device_transport, DEVICE, request_timeout_s=2.0)
    for url in ("mqtt:targets/link", "mqtt:metadata/link.json", "mqtt:targets/nothing"):
        with pytest.raises(DownloadHTTPError):
            fetcher.download_bytes(url, 1000)
    with pytest.raises(DownloadError, match="refusing"):
        fetcher.download_bytes("mqtt:targets/../keys/x", 1000)

    answers: list[bytes] = []
    fleet.device_transport.subscribe(topics.data(DEVICE), lambda _t, p: answers.append(p))
    bad = b'{"id":"abc","path":"targets/x","offset":-1,"length":10}'
    assert fleet.device_transport.publish(topics.fetch(DEVICE), bad)
    deadline = time.monotonic() + 5
    while not answers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert answers
    answer = decode_answer(answers[0])
    assert (answer.id, answer.status) == ("abc", "bad_request")


def test_stray_answers_are_ignored(fleet: Fleet) -> None:
    for junk in (b"", b"garbage", b"EFD1\x00\x02{}", b"EFD1\x00\x02{}" + bytes(10)):
        assert fleet.server_transport.publish(topics.data(DEVICE), junk)
    fetcher = MqttFetcher(fleet.device_transport, DEVICE)
    data = fetcher.download_bytes("mqtt:metadata/timestamp.json", 16_384)
    assert data == (fleet.repo.metadata_dir / "timestamp.json").read_bytes()
