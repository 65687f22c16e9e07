"""The model registry table (``releases``), mirrored from the signed ``release`` role.

``Registry.sync`` reads the release role's targets (with their signed custom fields) and
upserts one row per bundle with its model card: the descriptive fields of the bundle's
``bundle.json``, read from the tar in the repository's targets directory after checking
its length and sha256 against the signed metadata.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

# tuf re-exports TargetFile without __all__, which mypy --strict flags.
from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]

from edge_agent.protocol.errors import ManifestError
from edge_agent.protocol.manifest import MANIFEST_NAME, parse_manifest
from edge_agent.protocol.repository import MODELS_PREFIX
from fleet_server.domain.rollout import NotFound
from fleet_server.repository import FleetRepository
from fleet_server.storage.audit import record_audit
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import Device, ReleaseRow

MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024


@dataclass(frozen=True)
class ReleaseView:
    """A released bundle as the registry shows it; ``running_on``: devices whose reported
    model is this release."""

    id: int
    target_path: str
    name: str
    version: str
    model: str
    runtime: str
    profiles: tuple[str, ...]
    size: int
    sha256: str
    release_counter: int
    model_card: dict[str, Any]
    released_at: datetime
    running_on: int

    def document(self) -> dict[str, Any]:
        """JSON-able, times in ISO 8601."""
        return {
            "id": self.id,
            "target_path": self.target_path,
            "name": self.name,
            "version": self.version,
            "model": self.model,
            "runtime": self.runtime,
            "profiles": list(self.profiles),
            "size": self.size,
            "sha256": self.sha256,
            "release_counter": self.release_counter,
            "model_card": self.model_card,
            "released_at": self.released_at.isoformat(),
            "running_on": self.running_on,
        }


@dataclass(frozen=True, slots=True)
class _Released:
    """One target of the release role, with the fields its custom block must carry."""

    path: str
    name: str
    version: str
    runtime: str
    profiles: tuple[str, ...]
    counter: int
    length: int
    sha256: str


class Registry:
    """The ``releases`` table: mirrored from the signed release role, read by key.

    Raises (every method):
        StorageError: the database failed.
    """

    def __init__(self, engine: Engine) -> None:
        self._sessions = session_factory(engine)

    def sync(self, repository: FleetRepository, *, now: datetime, actor: str = "registry") -> int:
        """Add a row for every release target not in the table yet; returns how many.

        Released bundles are immutable (the repository refuses to re-release a path with
        other bytes), so known paths are left alone. A target whose custom fields lack
        the release counter, runtime, profiles, model or version is not mirrored (it
        cannot be rolled out safely). A bundle whose tar is missing or does not match its
        signed length and sha256 is mirrored with the problem as its model card.

        Raises:
            RepositoryError: no release metadata.
        """
        released = [r for r in map(_released, repository.release_targets().items()) if r]
        with Transaction(self._sessions(), "reading the registry") as session:
            known = set(session.scalars(select(ReleaseRow.target_path)))
        fresh = [r for r in released if r.path not in known]
        if not fresh:
            return 0
        cards = {r.path: model_card(repository.targets_dir, r) for r in fresh}
        added = 0
        with Transaction(self._sessions(), "mirroring releases") as session:
            known = set(session.scalars(select(ReleaseRow.target_path)))
            for r in fresh:
                if r.path in known:  # another process mirrored it meanwhile
                    continue
                row = ReleaseRow(
                    target_path=r.path,
                    name=r.name,
                    version=r.version,
                    runtime=r.runtime,
                    profiles=list(r.profiles),
                    size=r.length,
                    sha256=r.sha256,
                    release_counter=r.counter,
                    model_card=cards[r.path],
                    released_at=now,
                )
                session.add(row)
                session.flush()
                record_audit(
                    session,
                    actor,
                    "release.register",
                    f"release/{row.id}",
                    {"target": r.path, "release_counter": r.counter},
                    now,
                )
                added += 1
        return added

    def releases(self) -> list[ReleaseView]:
        """Every release, newest first (by release time, then id)."""
        with Transaction(self._sessions(), "listing releases") as session:
            rows = list(
                session.scalars(
                    select(ReleaseRow).order_by(ReleaseRow.released_at.desc(), ReleaseRow.id.desc())
                )
            )
            running = _running(session, [f"{r.name}@{r.version}" for r in rows])
            return [_view(r, running) for r in rows]

    def release(self, key: str) -> ReleaseView:
        """One release by id (as a string), target path or ``name@version``.

        Raises:
            NotFound: no such release (the message says which forms a key may take).
        """
        with Transaction(self._sessions(), f"reading release {key!r}") as session:
            row = find_release(session, key)
            return _view(row, _running(session, [f"{row.name}@{row.version}"]))


def find_release(session: Session, key: str) -> ReleaseRow:
    """The release row for ``key``: an id, ``models/<name>-<version>.tar`` or
    ``name@version``.

    Raises:
        NotFound: no such release.
    """
    query = select(ReleaseRow)
    if key.isdigit() and len(key) < 12:
        query = query.where(ReleaseRow.id == int(key))
    elif key.startswith(MODELS_PREFIX):
        query = query.where(ReleaseRow.target_path == key)
    elif "@" in key:
        name, _, version = key.partition("@")
        query = query.where(ReleaseRow.name == name, ReleaseRow.version == version)
    else:
        raise NotFound(
            f"release {key!r}: give an id, a target path models/<name>-<version>.tar "
            "or name@version"
        )
    row = session.scalar(query)
    if row is None:
        raise NotFound(f"no release {key!r} in the registry")
    return row


def model_card(targets_dir: Path, released: _Released) -> dict[str, Any]:
    """The descriptive fields of the bundle's ``bundle.json``, read from its tar after
    checking the tar's length and sha256; ``{"unavailable": why}`` when that fails."""
    tar_path = targets_dir / released.path
    try:
        with tar_path.open("rb") as f:
            digest = hashlib.sha256()
            length = 0
            while chunk := f.read(1 << 20):
                length += len(chunk)
                digest.update(chunk)
                if length > released.length:
                    break
        if length != released.length or digest.hexdigest() != released.sha256:
            return {"unavailable": f"{released.path} does not match its signed length and sha256"}
        with tarfile.open(tar_path, "r:") as archive:
            member = archive.getmember(MANIFEST_NAME)
            data = archive.extractfile(member) if member.isreg() else None
            if data is None or member.size > MAX_MANIFEST_BYTES:
                return {"unavailable": f"{released.path}: {MANIFEST_NAME} is not a small file"}
            manifest = parse_manifest(data.read(), f"{released.path}:{MANIFEST_NAME}")
    except (OSError, tarfile.TarError, KeyError, EOFError) as e:
        return {"unavailable": f"cannot read {released.path}: {e}"}
    except ManifestError as e:
        return {"unavailable": str(e)}
    document = manifest.model_dump(mode="json")
    return {
        "name": manifest.name,
        "version": manifest.version,
        "description": manifest.description,
        "runtime": document["runtime"],
        "model_file": manifest.model,
        "input": {k: document["input"][k] for k in ("width", "height", "color", "layout")},
        "labels": list(manifest.output.labels),
        "defect_label": manifest.output.defect_label,
        "decision": document["decision"],
        "golden_samples": len(manifest.golden),
        "reference_profile": manifest.reference is not None,
        "files": len(manifest.files),
    }


def _released(item: tuple[str, TargetFile]) -> _Released | None:
    path, target = item
    custom = target.custom
    if not path.startswith(MODELS_PREFIX) or not isinstance(custom, dict):
        return None
    counter = custom.get("release_counter")
    runtime = custom.get("runtime")
    profiles = custom.get("profiles")
    name = custom.get("model")
    version = custom.get("version")
    sha256 = target.hashes.get("sha256")
    if (
        not isinstance(counter, int)
        or not isinstance(runtime, str)
        or not isinstance(profiles, list)
        or not all(isinstance(p, str) for p in profiles)
        or not isinstance(name, str)
        or not isinstance(version, str)
        or not isinstance(sha256, str)
    ):
        return None
    return _Released(path, name, version, runtime, tuple(profiles), counter, target.length, sha256)


def _running(session: Session, models: list[str]) -> Counter[str]:
    running: Counter[str] = Counter()
    if not models:
        return running
    query = (
        select(Device.model, func.count(Device.id))
        .where(Device.model.in_(sorted(set(models))))
        .group_by(Device.model)
    )
    for model, count in session.execute(query):
        if model is not None:
            running[model] = int(count)
    return running


def _view(row: ReleaseRow, running: Counter[str]) -> ReleaseView:
    model = f"{row.name}@{row.version}"
    return ReleaseView(
        id=row.id,
        target_path=row.target_path,
        name=row.name,
        version=row.version,
        model=model,
        runtime=row.runtime,
        profiles=tuple(row.profiles),
        size=row.size,
        sha256=row.sha256,
        release_counter=row.release_counter,
        model_card=dict(row.model_card),
        released_at=row.released_at,
        running_on=running[model],
    )
