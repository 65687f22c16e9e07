"""The fleet TUF repository: signs and publishes metadata with the python-tuf Metadata API.

Layout (consistent snapshots off, so every role has one current file name):

- ``metadata_dir``: ``1.root.json`` (and ``N.root.json`` after rotations), ``root.json``
  (latest), ``targets.json`` (release), ``director.json``, ``snapshot.json``,
  ``timestamp.json``.
- ``targets_dir``: ``models/<name>-<version>.tar`` and ``assignments/<device_id>``.

Every change re-signs the changed role, then snapshot, then timestamp, and writes them in
that order (timestamp last), each file atomically. Time always comes in as ``now``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
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
from tuf.api.serialization.json import JSONSerializer

from fleet_server.repository.errors import RepositoryError
from fleet_server.repository.keys import load_signers

RELEASE_ROLE = "targets"
DIRECTOR_ROLE = "director"
ASSIGNMENTS_PATTERN = "assignments/*"
ROOT_THRESHOLD = 2

# Names, versions and device ids become one path segment: the director's pattern
# "assignments/*" matches exactly one segment (python-tuf globs each "/" part separately).
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")
# Metadata[T] is constrained to the four top-level payload types.
_S = TypeVar("_S", Root, Timestamp, Snapshot, Targets)
# Published files are served to devices: world-readable (mkstemp would make them 0600).
_PUBLISHED_MODE = 0o644


@dataclass(frozen=True, slots=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=30)  # the release role and the director
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def expires(self, role: str, now: datetime) -> datetime:
        """Expiry for ``role`` signed at ``now`` (an aware datetime), in UTC.

        Raises:
            ValueError: ``now`` is naive.
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        lifetimes = {
            Root.type: self.root,
            Timestamp.type: self.timestamp,
            Snapshot.type: self.snapshot,
        }
        return now.astimezone(timezone.utc) + lifetimes.get(role, self.targets)


def release_path(name: str, version: str) -> str:
    """Target path of a model bundle: ``models/<name>-<version>.tar``."""
    return f"models/{name}-{version}.tar"


def assignment_path(device_id: str) -> str:
    """Target path of a device's assignment: ``assignments/<device_id>``."""
    return f"assignments/{device_id}"


def assignment_bytes(device_id: str, target_path: str) -> bytes:
    """Canonical JSON content of an assignment (sorted keys, no spaces, UTF-8)."""
    document = {"device": device_id, "target": target_path}
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def release_counter(target: TargetFile) -> int | None:
    """The ``release_counter`` custom field of a release target, if it has one."""
    custom = target.custom
    if isinstance(custom, dict):
        counter = custom.get("release_counter")
        if isinstance(counter, int):
            return counter
    return None


def next_release_counter(targets: Mapping[str, TargetFile], model: str) -> int:
    """One more than the highest release counter of ``model`` (1 for a new model)."""
    counters = [
        counter
        for target in targets.values()
        if isinstance(target.custom, dict) and target.custom.get("model") == model
        if (counter := release_counter(target)) is not None
    ]
    return max(counters, default=0) + 1


def _check_segment(what: str, value: str) -> None:
    if not _SEGMENT_RE.match(value):
        raise RepositoryError(
            f"invalid {what} {value!r}: use letters, digits, '.', '_', '+', '-' (max 128)"
        )


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

    def create(self, *, now: datetime) -> None:
        """Write version 1 of every role: root (2 of 3), targets, director, snapshot,
        timestamp.

        Raises:
            RepositoryError: the repository already exists, or keys are missing.
        """
        if (self.metadata_dir / "root.json").exists():
            raise RepositoryError(f"repository already exists in {self.metadata_dir}")
        signers = {
            role: load_signers(self._key_dir, role)
            for role in (Root.type, RELEASE_ROLE, DIRECTOR_ROLE, Snapshot.type, Timestamp.type)
        }
        if len(signers[Root.type]) < ROOT_THRESHOLD:
            raise RepositoryError(f"root needs at least {ROOT_THRESHOLD} keys")

        root = Root(expires=self._policy.expires(Root.type, now), consistent_snapshot=False)
        for role in (Root.type, Targets.type, Snapshot.type, Timestamp.type):
            for signer in signers[role]:
                root.add_key(signer.public_key, role)
        root.roles[Root.type].threshold = ROOT_THRESHOLD

        director_keys = {s.public_key.keyid: s.public_key for s in signers[DIRECTOR_ROLE]}
        director_role = DelegatedRole(
            name=DIRECTOR_ROLE,
            keyids=list(director_keys),
            threshold=1,
            # Terminating: no other role is searched for assignments/* after the director.
            terminating=True,
            paths=[ASSIGNMENTS_PATTERN],
        )
        release = Targets(
            expires=self._policy.expires(RELEASE_ROLE, now),
            delegations=Delegations(keys=director_keys, roles={DIRECTOR_ROLE: director_role}),
        )
        director = Targets(expires=self._policy.expires(DIRECTOR_ROLE, now))
        snapshot = Snapshot(expires=self._policy.expires(Snapshot.type, now))
        snapshot.meta = {
            f"{RELEASE_ROLE}.json": MetaFile(version=1),
            f"{DIRECTOR_ROLE}.json": MetaFile(version=1),
        }
        timestamp = Timestamp(
            expires=self._policy.expires(Timestamp.type, now),
            snapshot_meta=MetaFile(version=1),
        )

        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        # Offline root: two of the three keys sign, as at a real key ceremony.
        root_md = Metadata(root)
        self._sign(root_md, signers[Root.type][:ROOT_THRESHOLD])
        self._write(f"1.{Root.type}", root_md)
        self._sign_and_write(DIRECTOR_ROLE, Metadata(director), signers[DIRECTOR_ROLE])
        self._sign_and_write(RELEASE_ROLE, Metadata(release), signers[RELEASE_ROLE])
        self._sign_and_write(Snapshot.type, Metadata(snapshot), signers[Snapshot.type])
        self._sign_and_write(Timestamp.type, Metadata(timestamp), signers[Timestamp.type])
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
        """Publish a model bundle as ``models/<name>-<version>.tar`` and return its counter.

        The release counter is one more than the highest counter of ``name`` so far.
        Re-adding the same release with the same bytes and fields changes nothing and
        returns its counter.

        Raises:
            RepositoryError: invalid name/version/runtime, the path is already released with
                different bytes or fields, or keys are missing.
            OSError: the bundle cannot be read.
        """
        _check_segment("model name", name)
        _check_segment("version", version)
        if not runtime:
            raise RepositoryError("runtime must not be empty")
        path = release_path(name, version)
        release = self._read(RELEASE_ROLE, Targets)
        published = self.targets_dir / path
        staged = _stage_copy(bundle_tar_path, published.parent)
        try:
            info = TargetFile.from_file(path, str(staged), ["sha256"])
            existing = release.signed.targets.get(path)
            if existing is not None:
                counter = release_counter(existing)
                info.unrecognized_fields["custom"] = _release_custom(
                    counter, runtime, profiles, name, version
                )
                if counter is None or existing != info:
                    raise RepositoryError(
                        f"{path} is already released with different bytes or fields"
                    )
                staged.unlink()
                return counter
            counter = next_release_counter(release.signed.targets, name)
            info.unrecognized_fields["custom"] = _release_custom(
                counter, runtime, profiles, name, version
            )
            os.replace(staged, published)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        _fsync_dir(published.parent)
        release.signed.targets[path] = info
        self._publish_targets(RELEASE_ROLE, release, now)
        return counter

    def assign(self, device_id: str, target_path: str, *, now: datetime) -> None:
        """Publish the director's ``assignments/<device_id>``, pointing at ``target_path``.

        Raises:
            RepositoryError: invalid device id, ``target_path`` is not a released model, or
                keys are missing.
        """
        _check_segment("device id", device_id)
        release = self._read(RELEASE_ROLE, Targets)
        if not target_path.startswith("models/") or target_path not in release.signed.targets:
            raise RepositoryError(f"{target_path!r} is not a released model target")
        path = assignment_path(device_id)
        content = assignment_bytes(device_id, target_path)
        director = self._read(DIRECTOR_ROLE, Targets)
        director.signed.targets[path] = TargetFile.from_data(path, content, ["sha256"])
        _write_atomic(self.targets_dir / path, content)
        self._publish_targets(DIRECTOR_ROLE, director, now)

    def refresh_timestamp(self, *, now: datetime) -> None:
        """Re-sign timestamp (next version) to expire one timestamp lifetime after ``now``.

        Raises:
            RepositoryError: keys are missing.
        """
        timestamp = self._read(Timestamp.type, Timestamp)
        self._bump(timestamp, Timestamp.type, now)

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
        md: Metadata[Any] = Metadata.from_file(str(path))
        if not isinstance(md.signed, kind):
            raise RepositoryError(f"{path} holds {md.signed.type}, not {kind.type}")
        return md

    def _write(self, name: str, md: Metadata[_S]) -> None:
        data = md.to_bytes(JSONSerializer(compact=False))
        _write_atomic(self.metadata_dir / f"{name}.json", data)


def _release_custom(
    counter: int | None, runtime: str, profiles: list[str], name: str, version: str
) -> dict[str, Any]:
    return {
        "release_counter": counter,
        "runtime": runtime,
        "profiles": list(profiles),
        "model": name,
        "version": version,
    }


def _stage_copy(source: Path, directory: Path) -> Path:
    """Copy ``source`` to a fsynced temp file in ``directory`` (for a later os.replace)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".staging-")
    staged = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            os.fchmod(out.fileno(), _PUBLISHED_MODE)
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same directory, write, fsync, os.replace, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), _PUBLISHED_MODE)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
