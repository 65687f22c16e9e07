"""The device's trust decisions (`TrustClient`): python-tuf's checks plus the two-role check,
against a `FleetSimulator` served by the real `ChunkServer` over a real Mosquitto.

Each attack asserts the typed reason and that the trust state on disk is unchanged."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.transport import MqttTransport
from edge_agent.update.errors import Reason, TransferError, TrustError, UpdateError
from edge_agent.update.mqtt_fetcher import MqttFetcher
from edge_agent.update.trust import DeviceFacts, Release, TrustClient, parse_assignment
from tests.fleet_simulator import FleetSimulator, TamperingChunkServer
from tests.mqtt_broker import MosquittoBroker, connect, mosquitto_broker  # noqa: F401

DEVICE = "dev-1"
FACTS = DeviceFacts(DEVICE, "x86-generic", frozenset({"onnx", "tflite"}))
BUNDLE_V1 = b"bundle one " * 1000
BUNDLE_V2 = b"bundle two " * 1000


@dataclass
class TrustRig:
    sim: FleetSimulator
    client: TrustClient
    server: TamperingChunkServer
    server_transport: MqttTransport

    def check(
        self,
        now: datetime | None = None,
        counters: dict[str, int] | None = None,
        blocklist: dict[str, str] | None = None,
    ) -> Release | None:
        return self.client.check(now or datetime.now(timezone.utc), counters or {}, blocklist or {})

    def trust_files(self) -> dict[str, bytes]:
        root = self.client.trusted_dir()
        assert root is not None
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }

    def refused(self, reason: Reason, **kwargs: object) -> TrustError:
        before = self.trust_files()
        with pytest.raises(TrustError) as caught:
            self.check(**kwargs)  # type: ignore[arg-type]
        assert caught.value.reason == reason, caught.value
        assert self.trust_files() == before, "trust state changed by a refused update"
        return caught.value


@pytest.fixture
def rig(mosquitto: MosquittoBroker, tmp_path: Path) -> Iterator[TrustRig]:
    sim = FleetSimulator(tmp_path / "served")
    v1 = sim.add_release("defect", "1", BUNDLE_V1, counter=1)
    sim.assign(DEVICE, v1)
    sim.publish()
    server_transport = connect(mosquitto, "fleet-server")
    device_transport = connect(mosquitto, DEVICE)
    server = TamperingChunkServer(server_transport, sim.metadata_dir, sim.targets_dir)
    fetcher = MqttFetcher(device_transport, DEVICE, request_timeout_s=0.5, retries=2)
    probe = MqttFetcher(device_transport, DEVICE, request_timeout_s=0.1, retries=50)
    probe.download_bytes("mqtt:metadata/1.root.json", 512_000)
    fetcher = MqttFetcher(device_transport, DEVICE, request_timeout_s=0.5, retries=2)
    client = TrustClient(tmp_path / "device" / "trust", sim.bootstrap_root, fetcher, FACTS)
    rig = TrustRig(sim, client, server, server_transport)
    first = rig.check()
    assert first is not None and first.path == v1 and first.counter == 1
    try:
        yield rig
    finally:
        device_transport.stop()
        server_transport.stop()


def _release_v2(sim: FleetSimulator, counter: int = 2, **kwargs: object) -> str:
    path = sim.add_release("defect", "2", BUNDLE_V2, counter=counter, **kwargs)  # type: ignore[arg-type]
    sim.assign(DEVICE, path)
    return path


def test_new_assignment_is_found(rig: TrustRig) -> None:
    v2 = _release_v2(rig.sim)
    rig.sim.publish()
    release = rig.check(counters={"defect": 1})
    assert release is not None
    assert (release.path, release.counter, release.model, release.version) == (v2, 2, "defect", "2")
    assert release.length == len(BUNDLE_V2)


def test_no_assignment_is_none(rig: TrustRig) -> None:
    del rig.sim.md["director"].signed.targets[f"assignments/{DEVICE}"]
    rig.sim.publish()
    assert rig.check() is None


# -- attacks on metadata (numbers from the attack list) ----------------------------------


def test_04_oversized_metadata(rig: TrustRig) -> None:
    _release_v2(rig.sim)
    rig.sim.md["timestamp"].signed.unrecognized_fields["padding"] = "x" * 20_000
    rig.sim.publish()
    rig.refused(Reason.METADATA)


@pytest.mark.parametrize("how", ["unknown_key", "unsigned"])
def test_05_metadata_signed_by_unknown_key_or_unsigned(rig: TrustRig, how: str) -> None:
    from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

    _release_v2(rig.sim)
    rig.sim.publish()
    rig.sim.md["director"].signed.version += 1
    rig.sim.sign("director", [CryptoSigner.generate_ed25519()] if how == "unknown_key" else [])
    rig.sim.write_role("director")
    rig.refused(Reason.METADATA)


def test_06_threshold_met_by_one_key_listed_twice(rig: TrustRig) -> None:
    # Root needs 2 of 3: one key's signature twice must not count as two.
    root = rig.sim.md["root"]
    root.signed.version += 1
    signer = rig.sim.signers["root"][0]
    root.signatures.clear()
    root.sign(signer, append=True)
    raw = root.to_dict()
    raw["signatures"] = raw["signatures"] * 2
    import json

    rig.sim.write_served(f"{root.signed.version}.root.json", json.dumps(raw).encode())
    rig.refused(Reason.METADATA)


def test_07_valid_signature_moved_onto_other_bytes(rig: TrustRig) -> None:
    _release_v2(rig.sim)
    rig.sim.publish()
    director = rig.sim.md["director"]
    signatures = dict(director.signatures)
    director.signed.targets.clear()  # other content, same signature
    director.signatures.clear()
    director.signatures.update(signatures)
    rig.sim.write_role("director")
    rig.refused(Reason.METADATA)


def test_08_key_scheme_swapped(rig: TrustRig) -> None:
    import json

    _release_v2(rig.sim)
    rig.sim.publish()
    raw = json.loads(rig.sim.served_bytes("timestamp.json"))
    for key in raw["signed"].get("keys", {}).values():
        key["scheme"] = "rsassa-pss-sha256"
    root = json.loads(rig.sim.served_bytes("root.json"))
    for key in root["signed"]["keys"].values():
        key["scheme"] = "ecdsa-sha2-nistp256"
    root["signed"]["version"] += 1
    rig.sim.write_served(f"{root['signed']['version']}.root.json", json.dumps(root).encode())
    rig.refused(Reason.METADATA)


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets", "release", "director"])
def test_09_role_version_lower_than_stored(rig: TrustRig, role: str) -> None:
    old = {name: rig.sim.served_bytes(f"{name}.json") for name in ("timestamp", "snapshot")}
    _release_v2(rig.sim)
    rig.sim.publish(bump=("targets", "release", "director"))
    assert rig.check(counters={"defect": 1}) is not None  # the device now trusts these
    if role in old:
        # Replay the previously served, validly signed file.
        rig.sim.write_served(f"{role}.json", old[role])
        if role == "snapshot":
            rig.sim.md["timestamp"].signed.snapshot_meta.version -= 1
            rig.sim.md["timestamp"].signed.version += 1
            rig.sim.sign("timestamp")
            rig.sim.write_role("timestamp")
    else:
        # A freshly signed snapshot that lists a lower version of the role.
        rig.sim.md[role].signed.version -= 1
        rig.sim.publish(bump=())
    rig.refused(Reason.METADATA)


def test_10_newer_release_with_lower_counter(rig: TrustRig) -> None:
    _release_v2(rig.sim, counter=1)
    rig.sim.publish()
    rig.refused(Reason.COUNTER_ROLLBACK, counters={"defect": 5})


def test_11_same_version_different_content(rig: TrustRig) -> None:
    # A validly signed timestamp with the version the device already trusts, pointing at
    # other content: python-tuf keeps the trusted timestamp (and so the trusted snapshot
    # and director), and the served assignment no longer matches the trusted hash.
    _release_v2(rig.sim)
    rig.sim.publish()
    timestamp = rig.sim.md["timestamp"]
    timestamp.signed.version -= 1
    rig.sim.sign("timestamp")
    rig.sim.write_role("timestamp")
    rig.refused(Reason.METADATA)


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets", "release", "director"])
def test_12_expired_metadata(rig: TrustRig, role: str) -> None:
    _release_v2(rig.sim)
    expired = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
    rig.sim.md[role].signed.expires = expired
    rig.sim.publish(bump=("targets", "release", "director"))
    rig.refused(Reason.METADATA)


def test_14_clock_set_backwards_does_not_revive_expired_metadata(rig: TrustRig) -> None:
    now = datetime.now(timezone.utc)
    # The device has trusted a time two days ahead; its clock is now set back.
    rig.refused(Reason.METADATA, now=now + timedelta(days=2))


def test_15_mix_and_match_snapshot_and_targets(rig: TrustRig) -> None:
    v2 = _release_v2(rig.sim)
    rig.sim.publish()
    # A director from a version the snapshot does not list.
    director = rig.sim.md["director"]
    director.signed.version += 1
    del director.signed.targets[f"assignments/{DEVICE}"]
    rig.sim.sign("director")
    rig.sim.write_role("director")
    rig.refused(Reason.METADATA)
    assert v2


def test_18_stolen_director_key_assigns_unreleased_bundle(rig: TrustRig) -> None:
    rig.sim.write_target("models/evil-1.tar", b"evil")
    rig.sim.assign(DEVICE, "models/evil-1.tar")
    rig.sim.publish()
    rig.refused(Reason.NOT_RELEASED)


def test_18b_stolen_release_key_cannot_assign(rig: TrustRig) -> None:
    from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]

    v2 = _release_v2(rig.sim)
    del rig.sim.md["director"].signed.targets[f"assignments/{DEVICE}"]
    data = f'{{"device": "{DEVICE}", "target": "{v2}"}}'.encode()
    rig.sim.write_target(f"assignments/{DEVICE}", data)
    path = f"assignments/{DEVICE}"
    rig.sim.md["release"].signed.targets[path] = TargetFile.from_data(path, data, ["sha256"])
    rig.sim.publish()
    # The release role may not sign assignments (terminating delegations): no assignment.
    assert rig.check() is None


@pytest.mark.parametrize(
    ("runtime", "profiles"), [("tensorrt", ("x86-generic",)), ("onnx", ("rpi4",))]
)
def test_20_bundle_for_another_profile_or_runtime(
    rig: TrustRig, runtime: str, profiles: tuple[str, ...]
) -> None:
    _release_v2(rig.sim, runtime=runtime, profiles=profiles)
    rig.sim.publish()
    rig.refused(Reason.INCOMPATIBLE)


def test_29_assignment_for_another_device(rig: TrustRig) -> None:
    v2 = _release_v2(rig.sim)
    rig.sim.assign(DEVICE, v2, content=f'{{"device": "dev-2", "target": "{v2}"}}'.encode())
    rig.sim.publish()
    rig.refused(Reason.WRONG_DEVICE)


def test_blocklisted_bundle_is_refused(rig: TrustRig) -> None:
    _release_v2(rig.sim)
    rig.sim.publish()
    release = rig.check()
    assert release is not None
    rig.refused(Reason.BLOCKLISTED, blocklist={release.sha256: "gate_nan"})


def test_server_gone_is_a_transfer_error(rig: TrustRig, mosquitto: MosquittoBroker) -> None:
    mosquitto.stop()
    with pytest.raises(TransferError) as caught:
        rig.check()
    assert caught.value.reason == Reason.TRANSPORT


def test_16_fast_forward_attack_then_key_rotation_recovers(rig: TrustRig) -> None:
    # A stolen timestamp key pushes the timestamp version far ahead.
    timestamp = rig.sim.md["timestamp"]
    honest_version = timestamp.signed.version
    timestamp.signed.version = 1000
    rig.sim.sign("timestamp")
    rig.sim.write_role("timestamp")
    assert rig.check() is not None  # validly signed: the device cannot tell
    # The honest repository can no longer publish: its versions are "lower".
    timestamp.signed.version = honest_version
    _release_v2(rig.sim)
    rig.sim.publish()
    rig.refused(Reason.METADATA)
    # Recovery: root rotates the timestamp key; the fast-forwarded timestamp no longer
    # verifies under the new root and is dropped.
    rig.sim.rotate_role_keys("timestamp")
    rig.sim.publish()
    release = rig.check(counters={"defect": 1})
    assert release is not None and release.version == "2"


@pytest.mark.parametrize("signed_by", ["new_only", "old_only"])
def test_17_root_rotation_needs_old_and_new_keys(rig: TrustRig, signed_by: str) -> None:
    old = list(rig.sim.signers["root"])
    rig.sim.rotate_root(new_keys=True, signers=[])
    new = rig.sim.signers["root"]
    chosen = new[:2] if signed_by == "new_only" else old[:2]
    root = rig.sim.md["root"]
    root.signatures.clear()
    for signer in chosen:
        root.sign(signer, append=True)
    rig.sim.write_served(f"{root.signed.version}.root.json", root.to_bytes())
    rig.refused(Reason.METADATA)


def test_17_root_rotation_signed_by_both_is_accepted(rig: TrustRig) -> None:
    rig.sim.rotate_root(new_keys=True)
    _release_v2(rig.sim)
    rig.sim.publish()
    release = rig.check(counters={"defect": 1})
    assert release is not None and release.version == "2"
    trusted = rig.client.trusted_dir()
    assert trusted is not None
    assert (trusted / "root_history" / "2.root.json").is_file()


def test_17_root_rotation_skipping_a_version(rig: TrustRig) -> None:
    # Root 3 is published without root 2: the chain is broken, and metadata signed by
    # keys only root 3 knows is refused.
    rig.sim.rotate_root(new_keys=True)
    (rig.sim.metadata_dir / "2.root.json").unlink()
    rig.sim.rotate_role_keys("timestamp")  # root 3
    rig.sim.publish()
    rig.refused(Reason.METADATA)


# -- 28: malformed and fuzzed input never crashes the device ------------------------------


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    role=st.sampled_from(["timestamp", "snapshot", "targets", "release", "director"]),
    data=st.one_of(
        st.binary(max_size=2000),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=10), inner, max_size=4)
            ),
            max_leaves=20,
        ).map(lambda doc: json.dumps(doc).encode()),
    ),
)
def test_28_fuzzed_metadata_is_refused_not_crashed(rig: TrustRig, role: str, data: bytes) -> None:
    # Every role gets a new version, so the device must fetch the fuzzed file.
    _release_v2(rig.sim)
    rig.sim.publish(bump=("targets", "release", "director"))
    rig.sim.write_served(f"{role}.json", data)
    before = rig.trust_files()
    with pytest.raises(UpdateError) as caught:
        rig.check(counters={"defect": 1})
    assert caught.value.reason in (Reason.METADATA, Reason.TRANSPORT)
    assert rig.trust_files() == before


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_28_fuzzed_assignment_bytes(data: bytes) -> None:
    try:
        parse_assignment(data, DEVICE)
    except TrustError as e:
        assert e.reason in (Reason.METADATA, Reason.WRONG_DEVICE, Reason.NOT_RELEASED)


def test_28_garbage_on_the_data_topic_is_ignored(rig: TrustRig) -> None:
    import random

    from edge_agent.protocol import topics

    noise = random.Random(7)
    stop = threading.Event()

    def spray() -> None:
        while not stop.is_set():
            size = noise.randrange(0, 300)
            payload = bytes(noise.getrandbits(8) for _ in range(size))
            if noise.random() < 0.3:
                payload = b"EFD1" + payload
            rig.server_transport.publish(topics.data(DEVICE), payload, qos=0)
            time.sleep(0.001)

    sprayer = threading.Thread(target=spray, daemon=True)
    sprayer.start()
    try:
        _release_v2(rig.sim)
        rig.sim.publish()
        release = rig.check(counters={"defect": 1})
        assert release is not None and release.version == "2"
    finally:
        stop.set()
        sprayer.join()
