"""The whole update path on a running line: a real pipeline inspects synthetic frames
while the manager checks, downloads, stages, gates and swaps in a new model.

Every refusal must leave the old model serving, with no lost or failed frame."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.protocol import topics
from edge_agent.protocol.events import EventKind
from edge_agent.protocol.notify import encode_notify
from edge_agent.update.errors import Reason
from tests.fleet_simulator import wait_for
from tests.mqtt_broker import MosquittoBroker, mosquitto_broker  # noqa: F401
from tests.tmpfs import small_tmpfs
from tests.update_rig import DEVICE, MODEL, DeviceRig, device_rig


@pytest.fixture
def rig(mosquitto: MosquittoBroker, tmp_path: Path) -> Iterator[DeviceRig]:
    yield from device_rig(mosquitto, tmp_path)


def assert_old_model_serves(rig: DeviceRig) -> None:
    """Refused: the old model keeps serving, and the trust state is what it was."""
    assert rig.trust_files() == rig.trust_baseline, "a refused update changed the trust state"
    assert rig.active_version() == "1"
    assert rig.serving("1")
    assert rig.line.errors() == 0
    assert rig.line.frame_ids_complete()
    assert rig.line.failure is None


def test_update_is_gated_and_swapped_in_without_losing_a_frame(rig: DeviceRig) -> None:
    path = rig.offer_version("2", counter=2)
    release = rig.run_once()
    assert release is not None and release.path == path
    assert rig.kinds()[0] == EventKind.DOWNLOADING
    for kind in (
        EventKind.VERIFIED,
        EventKind.STAGED,
        EventKind.GATE_STARTED,
        EventKind.GATE_PASSED,
        EventKind.ACTIVATED,
    ):
        assert kind in rig.kinds()
    passed = rig.last(EventKind.GATE_PASSED)
    assert passed.figures["frames"] >= 30
    assert passed.figures["agreement"] >= 0.9
    assert passed.figures["p99_latency_ms"] > 0
    assert rig.last(EventKind.DOWNLOADING).percent == 100
    assert rig.active_version() == "2"
    assert rig.state.state.counters[MODEL] == 2
    assert rig.state.state.pending is None
    assert rig.serving("2")
    assert rig.line.models() == [f"{MODEL}@1", f"{MODEL}@2"]
    assert rig.line.errors() == 0 and rig.line.frame_ids_complete()
    # The same events went out on the wire, in order.
    assert wait_for(lambda: len(rig.wire_events) >= len(rig.manager.events), 5)
    assert [e.event for e in rig.wire_events] == rig.kinds()
    # Nothing more to do on the next check.
    assert rig.run_once() is None
    assert rig.active_version() == "2"


def test_notify_triggers_a_check(rig: DeviceRig) -> None:
    rig.manager.start(check_now=False)
    rig.offer_version("2", counter=2)
    version = rig.sim.md["timestamp"].signed.version
    rig.server_transport.publish(topics.NOTIFY, encode_notify(version), retain=True)
    assert wait_for(lambda: rig.active_version() == "2", 60)


def test_13_replayed_old_notify_changes_nothing(rig: DeviceRig) -> None:
    before = rig.trust_files()
    events = len(rig.manager.events)
    rig.offer_version("2", counter=2)  # published, but the broker replays an old notify
    rig.manager.start(check_now=False)
    rig.server_transport.publish(topics.NOTIFY, encode_notify(1), retain=True)
    rig.server_transport.publish(topics.NOTIFY, b"garbage", retain=True)
    time.sleep(1.0)
    assert rig.trust_files() == before
    assert len(rig.manager.events) == events
    assert_old_model_serves(rig)


# -- 1, 2, 3, 19, 21: bad bytes --------------------------------------------------------------


def _served_tar(rig: DeviceRig, path: str) -> Path:
    return rig.sim.targets_dir / path


def test_01_flipped_byte_in_bundle(rig: DeviceRig) -> None:
    path = rig.offer_version("2", counter=2)
    served = _served_tar(rig, path)
    data = bytearray(served.read_bytes())
    data[len(data) // 3] ^= 0x40
    served.write_bytes(bytes(data))
    rig.run_once()
    refused = rig.last(EventKind.REFUSED)
    assert refused.reason == Reason.HASH_MISMATCH
    assert not list((rig.home / "downloads").glob("*.part"))
    assert_old_model_serves(rig)


@pytest.mark.parametrize("change", ["truncated", "one_byte_longer"])
def test_02_bundle_truncated_or_longer(rig: DeviceRig, change: str) -> None:
    path = rig.offer_version("2", counter=2)
    served = _served_tar(rig, path)
    data = served.read_bytes()
    served.write_bytes(data[:-1] if change == "truncated" else data + b"\0")
    rig.run_once()
    assert rig.last(EventKind.REFUSED).reason == Reason.LENGTH_MISMATCH
    assert_old_model_serves(rig)


def test_03_server_streams_past_the_signed_length(rig: DeviceRig) -> None:
    path = rig.offer_version("2", counter=2)
    served = _served_tar(rig, path)
    signed = served.stat().st_size
    served.write_bytes(served.read_bytes() + b"\0" * (8 * 1024 * 1024))
    rig.run_once()
    assert rig.last(EventKind.REFUSED).reason == Reason.LENGTH_MISMATCH
    on_disk = sum(p.stat().st_size for p in (rig.home / "downloads").rglob("*") if p.is_file())
    assert on_disk <= signed + 4096  # the part file (and a small bitmap), never more
    assert_old_model_serves(rig)


def test_19_bytes_of_bundle_b_served_for_bundle_a(rig: DeviceRig) -> None:
    path = rig.offer_version("2", counter=2)
    other = rig.offer_version("3", counter=3)
    rig.sim.assign(DEVICE, path)
    rig.sim.publish()
    a, b = _served_tar(rig, path), _served_tar(rig, other)
    data_b = b.read_bytes()
    size_a = a.stat().st_size
    a.write_bytes(data_b[:size_a].ljust(size_a, b"\0"))
    rig.run_once()
    assert rig.last(EventKind.REFUSED).reason == Reason.HASH_MISMATCH
    assert_old_model_serves(rig)


@pytest.mark.parametrize("member", ["unlisted", "dotdot"])
def test_21_bundle_with_unlisted_file_or_dotdot_path(rig: DeviceRig, member: str) -> None:
    import io
    import tarfile

    from tests.update_rig import make_bundle

    bundle = make_bundle(rig.tmp / "bundles" / "evil", "2")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for file in sorted(bundle.rglob("*")):
            if file.is_file():
                archive.add(file, arcname=str(file.relative_to(bundle)))
        extra = b"#!/bin/sh\necho owned\n"
        info = tarfile.TarInfo("extra.sh" if member == "unlisted" else "../../../etc/evil")
        info.size = len(extra)
        archive.addfile(info, io.BytesIO(extra))
    path = rig.sim.add_release(MODEL, "2", buffer.getvalue(), counter=2)
    rig.sim.assign(DEVICE, path)
    rig.sim.publish()
    rig.run_once()
    refused = rig.last(EventKind.REFUSED)
    assert refused.reason == (Reason.BAD_BUNDLE if member == "unlisted" else Reason.BAD_ARCHIVE)
    assert not (rig.tmp / "etc").exists()
    assert rig.state.state.blocklist.get(refused.sha256 or "") == refused.reason
    assert_old_model_serves(rig)


# -- 26, 27: health gate -------------------------------------------------------------------


def _garbage_model(draft: dict[str, Any], bundle: Path) -> None:
    (bundle / "model.onnx").write_bytes(b"not an onnx model" * 100)


def _wrong_golden(draft: dict[str, Any], bundle: Path) -> None:
    draft["golden"][0]["p_defect"] = 1.0 - draft["golden"][0]["p_defect"]


def _strict_thresholds(draft: dict[str, Any], bundle: Path) -> None:
    # Calls almost everything uncertain: disagrees with the active model.
    draft["decision"] = {"t_fail": 0.999999, "t_uncertain": 0.0000001}


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_garbage_model, Reason.GATE_LOAD),
        (_wrong_golden, Reason.GATE_GOLDEN),
        (_strict_thresholds, Reason.GATE_AGREEMENT),
    ],
)
def test_26_gate_failures(rig: DeviceRig, edit: Any, reason: Reason) -> None:
    path = rig.offer_version("2", counter=2, edit=edit)
    rig.run_once()
    failed = rig.last(EventKind.GATE_FAILED)
    assert failed.reason == reason and failed.target == path
    assert failed.sha256 in rig.state.state.blocklist
    assert rig.state.state.pending is None
    assert_old_model_serves(rig)
    # Blocklisted: the next check refuses it without downloading again.
    rig.run_once()
    assert rig.last(EventKind.REFUSED).reason == Reason.BLOCKLISTED


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        ({"max_latency_ms": 0.001}, Reason.GATE_LATENCY),
        ({"max_memory_mb": 1.0}, Reason.GATE_MEMORY),
    ],
)
def test_26_gate_limits(
    mosquitto: MosquittoBroker, tmp_path: Path, limits: dict[str, float], reason: Reason
) -> None:
    from dataclasses import replace

    from tests.update_rig import TEST_GATE

    gate = replace(
        TEST_GATE,
        max_latency_ms=limits.get("max_latency_ms", TEST_GATE.max_latency_ms),
        max_memory_mb=limits.get("max_memory_mb", TEST_GATE.max_memory_mb),
    )
    for rig in device_rig(mosquitto, tmp_path, gate=gate):
        rig.offer_version("2", counter=2)
        rig.run_once()
        failed = rig.last(EventKind.GATE_FAILED)
        assert failed.reason == reason
        assert failed.figures["frames"] >= 1
        assert_old_model_serves(rig)


def test_27_repeated_crash_during_gate_rolls_back(rig: DeviceRig) -> None:
    # Crashes are simulated by what a crash leaves: the attempt counted before the gate.
    path = rig.offer_version("2", counter=2)
    release = rig.trust.check(rig.state.trusted_now(), rig.state.state.counters, {}, commit=False)
    rig.trust.discard()
    assert release is not None and release.path == path
    for _ in range(3):
        rig.state.begin_attempt(release.sha256, release.path)
    rig.manager.recover()
    rolled = rig.last(EventKind.ROLLED_BACK)
    assert rolled.reason == Reason.GATE_CRASHED and rolled.sha256 == release.sha256
    assert rig.state.state.blocklist[release.sha256] == Reason.GATE_CRASHED
    assert rig.state.state.pending is None
    rig.run_once()
    assert rig.last(EventKind.REFUSED).reason == Reason.BLOCKLISTED
    assert_old_model_serves(rig)


def test_crash_after_switch_keeps_the_new_model(rig: DeviceRig) -> None:
    rig.offer_version("2", counter=2)
    assert rig.run_once() is not None
    # As if the agent died right after the pointer switch: pending still set.
    active = rig.slots.active()
    assert active is not None
    rig.state.begin_attempt(active.sha256, active.target_path)
    rig.state.state.counters[MODEL] = 1
    rig.manager.recover()
    assert rig.state.state.pending is None
    assert rig.state.state.counters[MODEL] == 2
    assert rig.last(EventKind.ACTIVATED).sha256 == active.sha256


# -- 22, 23: transfer faults ---------------------------------------------------------------


def test_22_stalled_transfer_times_out_then_resumes(rig: DeviceRig) -> None:
    path = rig.offer_version("2", counter=2)
    answered = [0]

    def stall_after_half(_device: str, answer: Any) -> list[tuple[float, Any]]:
        if answer.total > 100_000 and answer.offset >= answer.total // 2:
            return []  # the server goes silent half-way
        answered[0] += 1
        return [(0.0, answer)]

    rig.server.hook = stall_after_half
    rig.run_once()
    failed = rig.last(EventKind.FAILED)
    assert failed.reason in (Reason.TRANSPORT, Reason.TOO_SLOW)
    assert rig.downloader.partial_bytes(failed.sha256 or "") > 0
    assert_old_model_serves(rig)
    rig.server.hook = None
    release = rig.run_once()
    assert release is not None and release.path == path
    assert rig.active_version() == "2"


def test_23_duplicated_and_reordered_chunks(rig: DeviceRig) -> None:
    rig.offer_version("2", counter=2)

    def shuffle(_device: str, answer: Any) -> list[tuple[float, Any]]:
        # Every answer twice, the second copy late, and every other one delayed.
        delay = 0.02 if answer.offset // 65536 % 2 else 0.0
        return [(delay, answer), (0.05, answer)]

    rig.server.hook = shuffle
    assert rig.run_once() is not None
    assert rig.active_version() == "2"
    assert rig.line.errors() == 0


def test_30_disk_full_during_download(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    from edge_agent.update.download import BundleDownloader

    with small_tmpfs(tmp_path / "small", "300k") as small:
        for rig in device_rig(mosquitto, tmp_path, downloader_options={}):
            rig.manager.downloader = BundleDownloader(
                rig.transport, DEVICE, small / "downloads", request_timeout_s=0.5
            )
            rig.offer_version("2", counter=2)
            rig.run_once()
            assert rig.last(EventKind.REFUSED).reason == Reason.DISK_FULL
            assert not list((small / "downloads").glob("*.part"))
            assert_old_model_serves(rig)
