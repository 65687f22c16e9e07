"""Reference profiles of released models, looked up by a window's ``model`` (name@version).

Sources, first match wins:

- the server's TUF repository REPO: the model must be listed in
  ``REPO/metadata/release.json`` as ``models/<name>-<version>.tar``; the tar in
  ``REPO/targets`` is checked against the listed length and sha256, and only its
  ``bundle.json`` is read (no unpacking to disk);
- bundle directories (tests, and models not released through this server): a directory
  holding ``bundle.json``, or a directory of such directories.

Answers (the profile, or "none") are cached per model; "none" is asked again after
``retry_s``, so a model released while ingest runs is picked up.
"""

from __future__ import annotations

import logging
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import Metadata, Targets  # type: ignore[attr-defined]
from tuf.api.serialization import DeserializationError

from edge_agent.core.stats import edges_of
from edge_agent.protocol.errors import ManifestError
from edge_agent.protocol.manifest import (
    MANIFEST_NAME,
    BundleManifest,
    Decision,
    ReferenceProfile,
    parse_manifest,
)
from edge_agent.protocol.repository import RELEASE_ROLE
from edge_agent.protocol.telemetry import edges_id
from fleet_server.repository.layout import release_path

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
DEFAULT_RETRY_S = 60.0


class ReferenceError(Exception):
    """A released bundle or a bundle directory cannot be read; names the file."""


@dataclass(frozen=True, slots=True)
class ModelReference:
    """What the drift monitor needs of a model: its reference profile and decision, and
    the id of the profile's histogram edges (a window's ``ref`` must equal it)."""

    model: str
    profile: ReferenceProfile
    decision: Decision
    ref_id: str
    source: str


class ReferenceLibrary:
    """Reference profiles by model id, cached.

    Args:
        repo: the TUF repository directory (``metadata/``, ``targets/``), or None.
        bundle_dirs: bundle directories, or directories of bundle directories.
        retry_s: how long a "no reference" answer is kept.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        *,
        repo: Path | None = None,
        bundle_dirs: Sequence[Path] = (),
        retry_s: float = DEFAULT_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        self._repo = repo
        self._bundle_dirs = list(bundle_dirs)
        self._retry_s = retry_s
        self._clock = clock
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self._found: dict[str, ModelReference] = {}
        self._missing: dict[str, float] = {}

    def get(self, model: str) -> ModelReference | None:
        """The reference of ``model`` (``name@version``), or None (logged once per retry
        period) when no source has it, its bundle has no reference profile, or its
        bundle cannot be read."""
        found = self._found.get(model)
        if found is not None:
            return found
        missed = self._missing.get(model)
        if missed is not None and self._clock() - missed < self._retry_s:
            return None
        try:
            manifest, source = self._lookup(model)
        except ReferenceError as e:
            self._logger.warning("no reference for %s: %s", model, e)
            self._missing[model] = self._clock()
            return None
        if manifest.reference is None:
            self._logger.warning("%s (%s) has no reference profile", model, source)
            self._missing[model] = self._clock()
            return None
        profile = manifest.reference
        reference = ModelReference(
            model, profile, manifest.decision, edges_id(edges_of(profile)), source
        )
        self._found[model] = reference
        self._missing.pop(model, None)
        self._logger.info("reference for %s from %s (edges %s)", model, source, reference.ref_id)
        return reference

    def _lookup(self, model: str) -> tuple[BundleManifest, str]:
        name, sep, version = model.partition("@")
        if not sep or not name or not version:
            raise ReferenceError(f"model {model!r} is not name@version")
        if self._repo is not None:
            manifest = _from_repository(self._repo, name, version)
            if manifest is not None:
                return manifest, f"release {release_path(name, version)}"
        unreadable: list[str] = []
        for directory in self._bundle_dirs:
            try:
                candidates = [directory, *sorted(p for p in directory.iterdir() if p.is_dir())]
                for candidate in candidates:
                    path = candidate / MANIFEST_NAME
                    if not path.is_file():
                        continue
                    try:
                        manifest = _parse(path.read_bytes(), str(path))
                    except ReferenceError as e:
                        unreadable.append(str(e))  # another bundle may still match
                        continue
                    if manifest.id == model:
                        return manifest, str(candidate)
            except OSError as e:
                raise ReferenceError(f"cannot read bundle directory {directory}: {e}") from e
        skipped = f" (unreadable: {'; '.join(unreadable)})" if unreadable else ""
        raise ReferenceError(f"not released and in no bundle directory{skipped}")


def _from_repository(repo: Path, name: str, version: str) -> BundleManifest | None:
    release_file = repo / "metadata" / f"{RELEASE_ROLE}.json"
    try:
        release: Metadata[Targets] = Metadata.from_file(str(release_file))
    except (OSError, DeserializationError) as e:
        raise ReferenceError(f"cannot read {release_file}: {e}") from e
    if not isinstance(release.signed, Targets):
        raise ReferenceError(f"{release_file} does not hold targets metadata")
    target = release_path(name, version)
    info = release.signed.targets.get(target)
    if info is None:
        return None
    tar_path = repo / "targets" / target
    try:
        with tar_path.open("rb") as f:
            info.verify_length_and_hashes(f)
    except OSError as e:
        raise ReferenceError(f"cannot read {tar_path}: {e}") from e
    except LengthOrHashMismatchError as e:
        raise ReferenceError(f"{tar_path} does not match release.json: {e}") from e
    try:
        with tarfile.open(tar_path, "r:") as archive:
            member = archive.getmember(MANIFEST_NAME)
            if not member.isreg() or member.size > MAX_MANIFEST_BYTES:
                raise ReferenceError(f"{tar_path}: {MANIFEST_NAME} is not a small regular file")
            data = archive.extractfile(member)
            if data is None:
                raise ReferenceError(f"{tar_path}: {MANIFEST_NAME} has no content")
            raw = data.read(MAX_MANIFEST_BYTES + 1)
    except (tarfile.TarError, KeyError, EOFError) as e:
        raise ReferenceError(f"{tar_path}: no readable {MANIFEST_NAME}: {e}") from e
    return _parse(raw, f"{tar_path}:{MANIFEST_NAME}")


def _parse(data: bytes, source: str) -> BundleManifest:
    try:
        return parse_manifest(data, source)
    except ManifestError as e:
        raise ReferenceError(str(e)) from e
