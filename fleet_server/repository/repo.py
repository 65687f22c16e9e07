"""The fleet TUF repository: signs and publishes metadata with the python-tuf Metadata API.

Roles (ADR 6): top-level ``targets`` is a thin offline role that lists no targets and only
delegates, to ``release`` for ``models/*`` and to ``director`` for ``assignments/*``, both
terminating. So the release key cannot sign an assignment and the director key cannot
sign a model, whatever order a client searches roles in.

Layout (consistent snapshots off, so every role has one current file name):

- ``metadata_dir``: ``1.root.json`` (and ``N.root.json`` after rotations), ``root.json``
  (latest), ``targets.json``, ``release.json``, ``director.json``, ``snapshot.json``
  (lists the three targets files), ``timestamp.json``.
- ``targets_dir``: ``models/<name>-<version>.tar`` and ``assignments/<device_id>``.

Every change re-signs the changed role, then snapshot, then timestamp, and writes them in
that order (timestamp last), each file atomically, under an exclusive ``flock`` on
``metadata_dir`` so that a CLI release and a running server never interleave their
read-modify-write cycles. Time always comes in as ``now``.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

# Both packages re-export these names without __all__, which mypy --strict flags; the
# resolved types are the real ones.
from securesystemslib.signer import Signer  # type: ignore[attr-defined]
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
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from edge_agent.durable import fsync_dir
from edge_agent.protocol.repository import (
    ASSIGNMENTS_PATTERN,
    ASSIGNMENTS_PREFIX,
    DIRECTOR_ROLE,
    MODELS_PATTERN,
    RELEASE_ROLE,
    TARGETS_ROLE,
    assignment_bytes,
)
from fleet_server.repository.atomic import stage_copy, write_atomic
from fleet_server.repository.errors import RepositoryError
from fleet_server.repository.keys import load_signers
from fleet_server.repository.layout import (
    ROOT_THRESHOLD,
    ExpiryPolicy,
    assignment_path,
    check_segment,
    next_release_counter,
    release_counter,
    release_custom,
    release_path,
)

# Metadata[T] is constrained to the four top-level payload types.
_S = TypeVar("_S", Root, Timestamp, Snapshot, Targets)


class FleetRepository:
    """A TUF repository on local directories, signed with keys from ``key_dir``.

    Args:
        metadata_dir: where signed metadata is published (served as-is to devices).
        key_dir: private keys, as written by ``init_keys``; must not overlap the
            published directories.
        targets_dir: where target files (bundles, assignments) are published.
        policy: metadata lifetimes.

    Raises:
        RepositoryError: ``key_dir`` overlaps ``metadata_dir`` or ``targets_dir``.
    """

    def __init__(
        self,
        metadata_dir: Path,
        key_dir: Path,
        targets_dir: Path,
        policy: ExpiryPolicy | None = None,
    ) -> None:
        self.metadata_dir = metadata_dir
        self.targets_dir = targets_dir
        self._key_dir = key_dir
        self._policy = policy or ExpiryPolicy()
        keys = key_dir.resolve()
        for published in (metadata_dir.resolve(), targets_dir.resolve()):
            if (
                keys == published
                or keys.is_relative_to(published)
                or published.is_relative_to(keys)
            ):
                raise RepositoryError(
                    f"key directory {key_dir} must not overlap published directory {published}"
                )

    @property
    def policy(self) -> ExpiryPolicy:
        """The metadata lifetimes this repository signs with."""
        return self._policy

    def create(self, *, now: datetime) -> None:
        """Write version 1 of every role: root (2 of 3), targets (delegations only),
        release, director, snapshot, timestamp.

        Raises:
            RepositoryError: the repository already exists, or keys are missing.
        """
        if (self.metadata_dir / "root.json").exists():
            raise RepositoryError(f"repository already exists in {self.metadata_dir}")
        signers = {
            role: load_signers(self._key_dir, role)
            for role in (
                Root.type,
                TARGETS_ROLE,
                RELEASE_ROLE,
                DIRECTOR_ROLE,
                Snapshot.type,
                Timestamp.type,
            )
        }
        if len(signers[Root.type]) < ROOT_THRESHOLD:
            raise RepositoryError(f"root needs at least {ROOT_THRESHOLD} keys")

        root = Root(expires=self._policy.expires(Root.type, now), consistent_snapshot=False)
        for role in (Root.type, TARGETS_ROLE, Snapshot.type, Timestamp.type):
            for signer in signers[role]:
                root.add_key(signer.public_key, role)
        root.roles[Root.type].threshold = ROOT_THRESHOLD

        delegated_keys = {
            s.public_key.keyid: s.public_key
            for role in (RELEASE_ROLE, DIRECTOR_ROLE)
            for s in signers[role]
        }
        # Terminating: a path matching a role's pattern is looked up in that role only, so
        # no other role can ever answer for models/* or assignments/*.
        delegated_roles = {
            role: DelegatedRole(
                name=role,
                keyids=[s.public_key.keyid for s in signers[role]],
                threshold=1,
                terminating=True,
                paths=[pattern],
            )
            for role, pattern in (
                (RELEASE_ROLE, MODELS_PATTERN),
                (DIRECTOR_ROLE, ASSIGNMENTS_PATTERN),
            )
        }
        targets = Targets(
            expires=self._policy.expires(TARGETS_ROLE, now),
            delegations=Delegations(keys=delegated_keys, roles=delegated_roles),
        )
        release = Targets(expires=self._policy.expires(RELEASE_ROLE, now))
        director = Targets(expires=self._policy.expires(DIRECTOR_ROLE, now))
        snapshot = Snapshot(expires=self._policy.expires(Snapshot.type, now))
        snapshot.meta = {
            f"{role}.json": MetaFile(version=1)
            for role in (TARGETS_ROLE, RELEASE_ROLE, DIRECTOR_ROLE)
        }
        timestamp = Timestamp(
            expires=self._policy.expires(Timestamp.type, now),
            snapshot_meta=MetaFile(version=1),
        )

        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            if (self.metadata_dir / "root.json").exists():
                raise RepositoryError(f"repository already exists in {self.metadata_dir}")
            # Offline root: two of the three keys sign, as at a real key ceremony.
            root_md = Metadata(root)
            self._sign(root_md, signers[Root.type][:ROOT_THRESHOLD])
            self._write(f"1.{Root.type}", root_md)
            self._sign_and_write(TARGETS_ROLE, Metadata(targets), signers[TARGETS_ROLE])
            self._sign_and_write(RELEASE_ROLE, Metadata(release), signers[RELEASE_ROLE])
            self._sign_and_write(DIRECTOR_ROLE, Metadata(director), signers[DIRECTOR_ROLE])
            self._sign_and_write(Snapshot.type, Metadata(snapshot), signers[Snapshot.type])
            self._sign_and_write(Timestamp.type, Metadata(timestamp), signers[Timestamp.type])
            # root.json last: its presence means the repository is complete.
            self._write(Root.type, root_md)

    def add_release(
        self,
        name: str,
        version: str,
        bundle_tar_path: Path,
        *,
        runtime: str,
        profiles: list[str],
        now: datetime,
    ) -> int:
        """Publish a model bundle as ``models/<name>-<version>.tar`` in the ``release`` role
        and return its release counter.

        The release counter is one more than the highest counter of ``name`` so far.
        Re-adding the same release with the same bytes and fields changes nothing and
        returns its counter.

        Raises:
            RepositoryError: invalid name/version/runtime, the path is already released with
                different bytes or fields, or keys are missing.
            OSError: the bundle cannot be read.
        """
        check_segment("model name", name)
        check_segment("version", version)
        if not runtime:
            raise RepositoryError("runtime must not be empty")
        path = release_path(name, version)
        with self._locked():
            release = self._read(RELEASE_ROLE, Targets)
            self._check_keys(RELEASE_ROLE)
            published = self.targets_dir / path
            staged = stage_copy(bundle_tar_path, published.parent)
            try:
                info = TargetFile.from_file(path, str(staged), ["sha256"])
                existing = release.signed.targets.get(path)
                if existing is not None:
                    counter = release_counter(existing)
                    info.unrecognized_fields["custom"] = release_custom(
                        counter, runtime, profiles, name, version
                    )
                    if counter is None or existing != info:
                        raise RepositoryError(
                            f"{path} is already released with different bytes or fields"
                        )
                    staged.unlink()
                    return counter
                counter = next_release_counter(release.signed.targets, name)
                info.unrecognized_fields["custom"] = release_custom(
                    counter, runtime, profiles, name, version
                )
                os.replace(staged, published)
            except BaseException:
                staged.unlink(missing_ok=True)
                raise
            fsync_dir(published.parent)
            release.signed.targets[path] = info
            self._publish_targets(RELEASE_ROLE, release, now)
            return counter

    def released(self, target_path: str) -> TargetFile | None:
        """The ``release`` role's entry for ``target_path`` (with its custom fields), if any.

        Raises:
            RepositoryError: no release metadata (the repository was not created).
        """
        return self._read(RELEASE_ROLE, Targets).signed.targets.get(target_path)

    def assign(self, device_id: str, target_path: str, *, now: datetime) -> None:
        """Publish ``assignments/<device_id>`` in the ``director`` role, pointing at
        ``target_path``.

        Raises:
            RepositoryError: invalid device id, ``target_path`` is not a released model, or
                keys are missing.
        """
        check_segment("device id", device_id)
        with self._locked():
            release = self._read(RELEASE_ROLE, Targets)
            if not target_path.startswith("models/") or target_path not in release.signed.targets:
                raise RepositoryError(f"{target_path!r} is not a released model target")
            self._check_keys(DIRECTOR_ROLE)
            path = assignment_path(device_id)
            content = assignment_bytes(device_id, target_path)
            director = self._read(DIRECTOR_ROLE, Targets)
            director.signed.targets[path] = TargetFile.from_data(path, content, ["sha256"])
            write_atomic(self.targets_dir / path, content)
            self._publish_targets(DIRECTOR_ROLE, director, now)

    def assign_many(self, assignments: Mapping[str, str], *, now: datetime) -> None:
        """Publish ``assignments/<device_id>`` for every ``device_id -> target_path`` of
        ``assignments`` with one signing of director, snapshot and timestamp.

        All or nothing: every pair is checked before any file is written. An empty mapping
        changes nothing. Assigning a device its previous target again is how a rollback
        works (the release counter check on the device still applies).

        Raises:
            RepositoryError: an invalid device id, a target that is not a released model
                (both named), or keys are missing.
        """
        if not assignments:
            return
        for device_id in assignments:
            check_segment("device id", device_id)
        with self._locked():
            release = self._read(RELEASE_ROLE, Targets)
            for device_id, target_path in assignments.items():
                if (
                    not target_path.startswith("models/")
                    or target_path not in release.signed.targets
                ):
                    raise RepositoryError(
                        f"{target_path!r} (for device {device_id!r}) is not a released model target"
                    )
            self._check_keys(DIRECTOR_ROLE)
            director = self._read(DIRECTOR_ROLE, Targets)
            files: dict[Path, bytes] = {}
            for device_id, target_path in sorted(assignments.items()):
                path = assignment_path(device_id)
                content = assignment_bytes(device_id, target_path)
                director.signed.targets[path] = TargetFile.from_data(path, content, ["sha256"])
                files[self.targets_dir / path] = content
            _write_many(files)
            self._publish_targets(DIRECTOR_ROLE, director, now)

    def release_targets(self) -> dict[str, TargetFile]:
        """Every target the ``release`` role lists, by path (with its custom fields).

        Raises:
            RepositoryError: no release metadata (the repository was not created).
        """
        return dict(self._read(RELEASE_ROLE, Targets).signed.targets)

    def assignments(self) -> dict[str, str]:
        """The published assignments, ``device_id -> target_path``, read back from the
        assignment files the ``director`` role lists.

        Raises:
            RepositoryError: no director metadata, or an assignment file is missing or
                not an assignment document.
        """
        director = self._read(DIRECTOR_ROLE, Targets)
        found: dict[str, str] = {}
        for path in director.signed.targets:
            file = self.targets_dir / path
            try:
                document = json.loads(file.read_bytes())
            except (OSError, ValueError) as e:
                raise RepositoryError(f"cannot read assignment {file}: {e}") from e
            if not isinstance(document, dict) or not isinstance(document.get("target"), str):
                raise RepositoryError(f"{file} is not an assignment document")
            found[path.removeprefix(ASSIGNMENTS_PREFIX)] = document["target"]
        return found

    def refresh_timestamp(self, *, now: datetime) -> None:
        """Re-sign timestamp (next version) to expire one timestamp lifetime after ``now``.

        Raises:
            RepositoryError: keys are missing.
        """
        with self._locked():
            timestamp = self._read(Timestamp.type, Timestamp)
            self._bump(timestamp, Timestamp.type, now)

    def resign(self, role: str, *, now: datetime) -> None:
        """Re-sign ``role`` unchanged (next version, a fresh expiry from ``now``), then the
        roles that follow it: snapshot after a targets role, timestamp after snapshot.

        For the roles the server does not re-sign by itself: ``release`` (the ML team's
        key) and the offline ``targets``.

        Raises:
            RepositoryError: ``role`` is not targets, release, director, snapshot or
                timestamp, or its keys are missing.
        """
        with self._locked():
            if role in (TARGETS_ROLE, RELEASE_ROLE, DIRECTOR_ROLE):
                self._check_keys(role)
                self._publish_targets(role, self._read(role, Targets), now)
            elif role == Snapshot.type:
                self._check_keys(role)
                snapshot = self._read(Snapshot.type, Snapshot)
                self._bump(snapshot, Snapshot.type, now)
                timestamp = self._read(Timestamp.type, Timestamp)
                timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
                self._bump(timestamp, Timestamp.type, now)
            elif role == Timestamp.type:
                self._bump(self._read(Timestamp.type, Timestamp), Timestamp.type, now)
            else:
                raise RepositoryError(f"cannot re-sign role {role!r}")

    def expires(self, role: str) -> datetime:
        """When the published metadata of ``role`` expires.

        Raises:
            RepositoryError: no such metadata.
        """
        if role == Root.type:
            return self._read(role, Root).signed.expires
        if role == Snapshot.type:
            return self._read(role, Snapshot).signed.expires
        if role == Timestamp.type:
            return self._read(role, Timestamp).signed.expires
        return self._read(role, Targets).signed.expires

    def refresh_expiring(self, *, now: datetime) -> list[str]:
        """Re-sign each online role (director, snapshot, timestamp) that has less than half
        of its lifetime left at ``now``, plus the roles that must follow a change (a new
        director means a new snapshot, a new snapshot a new timestamp).

        Returns:
            The re-signed roles, in signing order (empty when nothing was due).

        Raises:
            RepositoryError: keys or metadata are missing.
        """
        resigned: list[str] = []
        with self._locked():
            director = self._read(DIRECTOR_ROLE, Targets)
            snapshot = self._read(Snapshot.type, Snapshot)
            timestamp = self._read(Timestamp.type, Timestamp)
            if self._policy.due(DIRECTOR_ROLE, director.signed.expires, now):
                self._bump(director, DIRECTOR_ROLE, now)
                snapshot.signed.meta[f"{DIRECTOR_ROLE}.json"] = MetaFile(
                    version=director.signed.version
                )
                resigned.append(DIRECTOR_ROLE)
            if resigned or self._policy.due(Snapshot.type, snapshot.signed.expires, now):
                self._bump(snapshot, Snapshot.type, now)
                timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
                resigned.append(Snapshot.type)
            if resigned or self._policy.due(Timestamp.type, timestamp.signed.expires, now):
                self._bump(timestamp, Timestamp.type, now)
                resigned.append(Timestamp.type)
        return resigned

    def timestamp_state(self) -> tuple[int, datetime]:
        """``(version, expires)`` of the published timestamp.

        Raises:
            RepositoryError: no timestamp metadata.
        """
        timestamp = self._read(Timestamp.type, Timestamp)
        return timestamp.signed.version, timestamp.signed.expires

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # flock on the published metadata directory itself: no lock file to serve or to
        # forget, and the lock is released by the kernel if the process dies.
        try:
            fd = os.open(self.metadata_dir, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError as e:
            raise RepositoryError(f"no repository in {self.metadata_dir}; run create()") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _check_keys(self, role: str) -> None:
        """Fail before publishing anything if a key needed to sign the change is missing."""
        for needed in (role, Snapshot.type, Timestamp.type):
            load_signers(self._key_dir, needed)

    def _publish_targets(self, role: str, md: Metadata[Targets], now: datetime) -> None:
        self._bump(md, role, now)
        snapshot = self._read(Snapshot.type, Snapshot)
        snapshot.signed.meta[f"{role}.json"] = MetaFile(version=md.signed.version)
        self._bump(snapshot, Snapshot.type, now)
        timestamp = self._read(Timestamp.type, Timestamp)
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        self._bump(timestamp, Timestamp.type, now)

    def _bump(self, md: Metadata[_S], role: str, now: datetime) -> None:
        md.signed.version += 1
        md.signed.expires = self._policy.expires(role, now)
        self._sign_and_write(role, md, load_signers(self._key_dir, role))

    def _sign_and_write(self, role: str, md: Metadata[_S], signers: list[Signer]) -> None:
        self._sign(md, signers)
        self._write(role, md)

    @staticmethod
    def _sign(md: Metadata[_S], signers: list[Signer]) -> None:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)

    def _read(self, role: str, kind: type[_S]) -> Metadata[_S]:
        path = self.metadata_dir / f"{role}.json"
        if not path.exists():
            raise RepositoryError(f"no {role} metadata in {self.metadata_dir}; run create()")
        try:
            md: Metadata[Any] = Metadata.from_file(str(path))
        except DeserializationError as e:
            raise RepositoryError(f"{path} is not valid {role} metadata: {e}") from e
        if not isinstance(md.signed, kind):
            raise RepositoryError(f"{path} holds {md.signed.type}, not {kind.type}")
        return md

    def _write(self, name: str, md: Metadata[_S]) -> None:
        data = md.to_bytes(JSONSerializer(compact=False))
        write_atomic(self.metadata_dir / f"{name}.json", data)


# Published files are served to devices: world-readable (as ``atomic.write_atomic``).
_PUBLISHED_MODE = 0o644
# Threads that fsync the staged files of one batch at once: the journal commits them
# together (1,000 assignments take well under a second instead of one fsync each).
_WRITE_THREADS = 16


def _write_many(files: Mapping[Path, bytes]) -> None:
    """Publish every ``path -> data`` of ``files`` atomically, world-readable: each is
    staged in a temp file and fsynced (in parallel), then renamed into place; each
    directory is fsynced once at the end. Temp files are removed on failure.
    """
    staged: dict[Path, Path] = {}
    lock = threading.Lock()

    def stage(item: tuple[Path, bytes]) -> None:
        path, data = item
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        with lock:
            staged[path] = tmp
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _PUBLISHED_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    try:
        with ThreadPoolExecutor(max_workers=_WRITE_THREADS) as pool:
            list(pool.map(stage, files.items()))
        for path in files:
            os.replace(staged.pop(path), path)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    for directory in {path.parent for path in files}:
        fsync_dir(directory)
