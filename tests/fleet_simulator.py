"""A fleet repository for tests that signs on demand and can lie.

Like python-tuf's ``RepositorySimulator``: every role's metadata lives in memory as
`Metadata` objects with their own keys, and ``publish`` signs and writes the files the
real `ChunkServer` serves to devices over a real broker. Attacks are ordinary edits
before ``publish`` (or raw bytes written with ``write_served``), and the served bytes can be
tampered on the wire with a `TamperingChunkServer`.

Role layout (ADR 6): top-level ``targets`` only delegates; ``release`` signs ``models/*``,
``director`` signs ``assignments/*``, both terminating.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer  # type: ignore[attr-defined]
from tuf.api.metadata import (  # type: ignore[attr-defined]
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from edge_agent.protocol.fetch_wire import FetchAnswer
from edge_agent.protocol.repository import DIRECTOR_ROLE, RELEASE_ROLE, assignment_bytes
from edge_agent.transport import MqttTransport
from fleet_server.workers.chunk_server import ChunkServer

RELEASE = RELEASE_ROLE
DIRECTOR = DIRECTOR_ROLE
ROLES = ("root", "timestamp", "snapshot", "targets", RELEASE, DIRECTOR)
DELEGATED = (RELEASE, DIRECTOR)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


class FleetSimulator:
    """Metadata for every role, signed and written to ``served/metadata`` on ``publish``.

    Args:
        served: directory holding ``metadata/`` and ``targets/`` as the server serves them.
        now: signing time (expiries are relative to it).
    """

    def __init__(self, served: Path, now: datetime | None = None) -> None:
        self.served = served
        self.metadata_dir = served / "metadata"
        self.targets_dir = served / "targets"
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        self.now = now or _now()
        self.signers: dict[str, list[Signer]] = {
            role: [CryptoSigner.generate_ed25519() for _ in range(3 if role == "root" else 1)]
            for role in ROLES
        }
        root = Root(expires=self.now + timedelta(days=365), consistent_snapshot=False)
        for role in ("root", "timestamp", "snapshot", "targets"):
            for signer in self.signers[role]:
                root.add_key(signer.public_key, role)
        root.roles["root"].threshold = 2
        delegations = Delegations(keys={}, roles={})
        targets = Targets(expires=self.now + timedelta(days=30), delegations=delegations)
        for role, pattern in ((RELEASE, "models/*"), (DIRECTOR, "assignments/*")):
            keys = {s.public_key.keyid: s.public_key for s in self.signers[role]}
            assert targets.delegations is not None and targets.delegations.roles is not None
            targets.delegations.keys.update(keys)
            targets.delegations.roles[role] = DelegatedRole(
                name=role, keyids=list(keys), threshold=1, terminating=True, paths=[pattern]
            )
        self.md: dict[str, Metadata[Any]] = {
            "root": Metadata(root),
            "targets": Metadata(targets),
            RELEASE: Metadata(Targets(expires=self.now + timedelta(days=30))),
            DIRECTOR: Metadata(Targets(expires=self.now + timedelta(days=30))),
            "snapshot": Metadata(Snapshot(expires=self.now + timedelta(days=7))),
            "timestamp": Metadata(Timestamp(expires=self.now + timedelta(days=1))),
        }
        self.root_history: list[bytes] = []
        self._published = False
        self._publish_root()
        self.publish(bump=())

    # -- content --------------------------------------------------------------------------

    def add_release(
        self,
        model: str,
        version: str,
        data: bytes,
        *,
        counter: int,
        runtime: str = "onnx",
        profiles: tuple[str, ...] = ("x86-generic",),
    ) -> str:
        """Serve ``data`` as ``models/<model>-<version>.tar`` and list it in release."""
        path = f"models/{model}-{version}.tar"
        self.write_target(path, data)
        info = TargetFile.from_data(path, data, ["sha256"])
        info.unrecognized_fields["custom"] = {
            "release_counter": counter,
            "runtime": runtime,
            "profiles": list(profiles),
            "model": model,
            "version": version,
        }
        self.md[RELEASE].signed.targets[path] = info
        return path

    def assign(self, device_id: str, target: str, *, content: bytes | None = None) -> str:
        """List ``assignments/<device_id>`` in director (content names device and target)."""
        path = f"assignments/{device_id}"
        data = content if content is not None else assignment_bytes(device_id, target)
        self.write_target(path, data)
        self.md[DIRECTOR].signed.targets[path] = TargetFile.from_data(path, data, ["sha256"])
        return path

    def write_target(self, path: str, data: bytes) -> None:
        dest = self.targets_dir / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)

    def write_served(self, name: str, data: bytes) -> None:
        """Overwrite a served metadata file with raw bytes (after ``publish``)."""
        (self.metadata_dir / name).write_bytes(data)

    def served_bytes(self, name: str) -> bytes:
        return (self.metadata_dir / name).read_bytes()

    # -- signing --------------------------------------------------------------------------

    def sign(self, role: str, signers: list[Signer] | None = None) -> None:
        md = self.md[role]
        md.signatures.clear()
        for signer in signers if signers is not None else self.signers[role]:
            md.sign(signer, append=True)

    def publish(self, bump: tuple[str, ...] = (RELEASE, DIRECTOR)) -> None:
        """Bump and re-sign ``bump`` roles, then snapshot and timestamp; write them all.

        The first call (from the constructor) writes version 1 of every role.
        """
        for role in bump:
            self.md[role].signed.version += 1
        snapshot = self.md["snapshot"]
        timestamp = self.md["timestamp"]
        if self._published:
            snapshot.signed.version += 1
            timestamp.signed.version += 1
        for role in ("targets", *DELEGATED):
            snapshot.signed.meta[f"{role}.json"] = MetaFile(version=self.md[role].signed.version)
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        for role in ("targets", *DELEGATED, "snapshot", "timestamp"):
            self.sign(role)
            self.write_role(role)
        self._published = True

    def write_role(self, role: str) -> None:
        """Write ``role`` as currently signed (no re-signing)."""
        data = self.md[role].to_bytes(JSONSerializer(compact=True))
        self.write_served(f"{role}.json", data)

    def rotate_root(self, signers: list[Signer] | None = None, *, new_keys: bool) -> None:
        """Publish root version N+1; with ``new_keys`` the root keys are replaced.

        ``signers`` overrides who signs (default: old and new root keys, as the spec
        requires: the new root must verify with the old root's threshold and its own).
        """
        root = self.md["root"]
        old = list(self.signers["root"])
        if new_keys:
            for signer in old:
                root.signed.revoke_key(signer.public_key.keyid, "root")
            self.signers["root"] = [CryptoSigner.generate_ed25519() for _ in range(3)]
            for signer in self.signers["root"]:
                root.signed.add_key(signer.public_key, "root")
        root.signed.version += 1
        chosen = signers if signers is not None else old[:2] + self.signers["root"][:2]
        root.signatures.clear()
        for signer in chosen:
            if signer.public_key.keyid not in root.signatures:
                root.sign(signer, append=True)
        self._publish_root()

    def rotate_role_keys(self, role: str) -> None:
        """Give a top-level role new keys in a new root (fast-forward recovery)."""
        root = self.md["root"]
        for signer in self.signers[role]:
            root.signed.revoke_key(signer.public_key.keyid, role)
        self.signers[role] = [CryptoSigner.generate_ed25519()]
        root.signed.add_key(self.signers[role][0].public_key, role)
        root.signed.version += 1
        self.sign("root", self.signers["root"][:2])
        self._publish_root()

    def _publish_root(self) -> None:
        md = self.md["root"]
        if not md.signatures:
            self.sign("root", self.signers["root"][:2])
        data = md.to_bytes(JSONSerializer(compact=True))
        self.root_history.append(data)
        self.write_served(f"{md.signed.version}.root.json", data)
        self.write_served("root.json", data)

    @property
    def bootstrap_root(self) -> bytes:
        return self.root_history[0]


AnswerHook = Callable[[str, FetchAnswer], list[tuple[float, FetchAnswer]]]


class TamperingChunkServer(ChunkServer):
    """The real chunk server, with a hook that may change, delay, repeat or drop answers.

    ``hook(device_id, answer) -> [(delay_s, answer), ...]``: each listed answer is sent
    after its delay (from a timer thread, so the network thread never sleeps); an empty
    list drops the answer.
    """

    def __init__(self, transport: MqttTransport, metadata_dir: Path, targets_dir: Path) -> None:
        super().__init__(transport, metadata_dir, targets_dir, cache_bytes=0)
        self.hook: AnswerHook | None = None

    def _answer(self, device_id: str, answer: FetchAnswer) -> None:
        hook = self.hook
        if hook is None:
            super()._answer(device_id, answer)
            return
        for delay_s, changed in hook(device_id, answer):
            if delay_s <= 0:
                super()._answer(device_id, changed)
            else:
                timer = threading.Timer(delay_s, super()._answer, (device_id, changed))
                timer.daemon = True
                timer.start()


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
