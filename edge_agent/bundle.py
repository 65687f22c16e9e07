"""Model bundles on disk: load and verify, or seal a directory into a bundle.

A bundle directory holds ``bundle.json`` and exactly the files it lists. Loading checks
that every listed file exists with the listed length and sha256, and that no other file
is present, so a bundle is either exactly what was released or refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.durable import write_atomic
from edge_agent.protocol.errors import BundleError, BundleFileError, ManifestError
from edge_agent.protocol.manifest import (
    MANIFEST_NAME,
    BundleManifest,
    dump_manifest,
    parse_manifest,
)

MAX_MANIFEST_BYTES = 1024 * 1024
_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Bundle:
    """A verified bundle: its directory and manifest."""

    path: Path
    manifest: BundleManifest

    def file(self, name: str) -> Path:
        if name not in self.manifest.files:
            raise KeyError(f"{name} is not a file of bundle {self.manifest.id}")
        return self.path / name

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model


def sha256_file(path: Path) -> tuple[int, str]:
    """Return (length, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    length = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            length += len(chunk)
    return length, digest.hexdigest()


def _list_files(root: Path) -> set[str]:
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        # os.walk does not descend into symlinked directories; list them so that an
        # unlisted link is refused like any other unlisted file.
        links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        for name in [*filenames, *links]:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME:
                found.add(rel)
    return found


def load_bundle(path: str | os.PathLike[str], *, verify_hashes: bool = True) -> Bundle:
    """Load the bundle in directory ``path`` and verify it.

    Raises:
        BundleError: the path is not a directory or has no manifest.
        ManifestError: the manifest is invalid (names the bad key).
        BundleFileError: a listed file is missing or altered, or an unlisted file exists
            (names the file).
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    manifest_path = root / MANIFEST_NAME
    try:
        size = manifest_path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{manifest_path}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        data = manifest_path.read_bytes()
    except FileNotFoundError as e:
        raise BundleError(f"{root}: no {MANIFEST_NAME} in bundle directory") from e
    except OSError as e:
        raise BundleError(f"{manifest_path}: cannot read: {e.strerror}") from e
    manifest = parse_manifest(data, source=str(manifest_path))

    present = _list_files(root)
    for name in sorted(present - set(manifest.files)):
        raise BundleFileError(name, "present in bundle but not listed in bundle.json")
    for name, entry in sorted(manifest.files.items()):
        file_path = root / name
        if name not in present or not file_path.is_file():
            raise BundleFileError(name, "listed in bundle.json but missing")
        if file_path.is_symlink():
            raise BundleFileError(name, "is a symbolic link")
        if not verify_hashes:
            if file_path.stat().st_size != entry.length:
                raise BundleFileError(name, "length differs from bundle.json")
            continue
        length, digest = sha256_file(file_path)
        if length != entry.length:
            raise BundleFileError(
                name, f"length {length} differs from bundle.json ({entry.length})"
            )
        if digest != entry.sha256:
            raise BundleFileError(name, "sha256 differs from bundle.json")
    return Bundle(root, manifest)


def seal_bundle(path: str | os.PathLike[str], draft: dict[str, object]) -> Bundle:
    """Write ``bundle.json`` for directory ``path`` from ``draft`` (a manifest without
    ``files``), listing every file in the directory with its length and sha256.

    Raises:
        ManifestError: the draft does not validate.
    """
    root = Path(path)
    files: dict[str, object] = {}
    for name in sorted(_list_files(root)):
        length, digest = sha256_file(root / name)
        files[name] = {"length": length, "sha256": digest}
    raw = dict(draft)
    raw["files"] = files
    manifest = parse_manifest(json.dumps(raw), source=f"draft for {root}")
    write_atomic(root / MANIFEST_NAME, dump_manifest(manifest))
    return Bundle(root, manifest)


def copy_bundle(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    version: str,
    edit: Callable[[dict[str, Any], Path], None] | None = None,
) -> Bundle:
    """Copy the bundle at ``source`` to the new directory ``dest`` as ``version``, re-sealed.

    ``edit(draft, dest)`` may change the manifest draft and the copied files first (tests
    build faulty candidates this way; a release pipeline re-versions a retrained model).

    Raises:
        BundleError: ``source`` does not verify, or the edited draft does not validate.
        FileExistsError: ``dest`` exists.
    """
    original = load_bundle(source)
    target = Path(dest)
    shutil.copytree(original.path, target)
    draft: dict[str, Any] = json.loads((target / MANIFEST_NAME).read_text())
    del draft["files"]
    draft["version"] = version
    (target / MANIFEST_NAME).unlink()
    if edit is not None:
        edit(draft, target)
    return seal_bundle(target, draft)
