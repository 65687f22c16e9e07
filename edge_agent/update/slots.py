"""A/B bundle slots on the device, switched by one atomically replaced pointer file.

Layout under ``root``::

    active.json         {"format": 1, "active": "a"}: the slot to load at start
    slots/a/            a bundle directory, exactly what `load_bundle` verifies
    slots/a.json        what slot a holds: target path, sha256, release counter, model
    slots/b/, slots/b.json
    .staging-*, .trash-*, .*.tmp    left by an interrupted stage; the next one removes them

The slot record sits beside its bundle directory, not inside it, because a bundle
directory may hold only the files its manifest lists. Every document is written
atomically (temp file, fsync, rename, fsync directory).

Crash safety: staging works only on the idle slot. Its record is removed first, the old
directory is renamed away, the archive is unpacked (and fsync'ed) into a temporary
directory inside ``root``, verified, renamed into place, and only then is the record
written. `activate` replaces the pointer in one rename, after checking that the slot's
bundle verifies. A kill -9 at any point leaves the old or the new pointer, and the slot it
names untouched and complete.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.bundle import Bundle, load_bundle
from edge_agent.durable import fsync_dir, write_atomic
from edge_agent.protocol.errors import BundleError
from edge_agent.update.errors import InstallError, Reason
from edge_agent.update.unpack import unpack_bundle

SlotName = Literal["a", "b"]
SLOT_NAMES: Final[tuple[SlotName, ...]] = ("a", "b")
POINTER_NAME: Final = "active.json"
MAX_DOCUMENT_BYTES: Final = 64 * 1024
DEFAULT_MAX_BUNDLE_BYTES: Final = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ReleaseInfo:
    """What the verified metadata says about a bundle: its target and release counter."""

    target_path: str
    sha256: str
    release_counter: int


@dataclass(frozen=True, slots=True)
class SlotInfo:
    """What one slot holds; `path` is its bundle directory."""

    slot: str
    path: Path
    target_path: str
    sha256: str
    release_counter: int
    model_name: str
    model_version: str


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


_DocumentT = TypeVar("_DocumentT", bound=_Document)


class _Pointer(_Document):
    format: Literal[1] = 1
    active: SlotName


class _SlotRecord(_Document):
    format: Literal[1] = 1
    target_path: Annotated[str, Field(min_length=1, max_length=512)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    release_counter: Annotated[int, Field(ge=0)]
    model_name: str
    model_version: str


class SlotStore:
    """Two bundle slots and the pointer to the active one.

    Args:
        root: the store's directory (created when needed).
        max_bundle_bytes, max_files: limits for unpacking an archive into a slot.
        logger: where fallbacks from a bad pointer are logged (warning).

    Not thread-safe; one process owns a store.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
        max_files: int = 256,
        logger: logging.Logger | None = None,
    ) -> None:
        self.root = root
        self._slots_dir = root / "slots"
        self._pointer = root / POINTER_NAME
        self._max_bundle_bytes = max_bundle_bytes
        self._max_files = max_files
        self._logger = logger if logger is not None else logging.getLogger(__name__)

    def slot(self, name: str) -> SlotInfo | None:
        """The record of slot `name`, or None if it holds no complete bundle (not re-hashed).

        Raises:
            ValueError: `name` is not "a" or "b".
        """
        _check_slot(name)
        record = _read_document(self._slots_dir / f"{name}.json", _SlotRecord)
        if record is None or not (self._slots_dir / name).is_dir():
            return None
        return SlotInfo(
            name,
            self._slots_dir / name,
            record.target_path,
            record.sha256,
            record.release_counter,
            record.model_name,
            record.model_version,
        )

    def active(self) -> SlotInfo | None:
        """The slot the pointer names; None for an empty store.

        A missing, corrupt or dangling pointer does not brick the device: the slots whose
        bundles verify are considered instead, the lowest release counter first (the
        newer one may be a candidate that never passed, or failed, its health gate), and
        a warning says why. The pointer itself is left alone; `activate` rewrites it.
        """
        pointer = _read_document(self._pointer, _Pointer)
        if pointer is not None:
            info = self.slot(pointer.active)
            if info is not None:
                return info
            problem = f"{POINTER_NAME} names slot {pointer.active}, which holds no bundle"
        elif self._pointer.exists():
            problem = f"{POINTER_NAME} is unreadable or invalid"
        else:
            problem = f"no {POINTER_NAME}"
        candidates = [info for info in self._recorded() if _verifies(info.path)]
        if not candidates and problem == f"no {POINTER_NAME}":
            return None  # an empty store, not a broken one
        candidates.sort(key=lambda info: (info.release_counter, info.slot))
        choice = candidates[0] if candidates else None
        self._logger.warning(
            "slot store %s: %s; falling back to %s",
            self.root,
            problem,
            f"slot {choice.slot} ({choice.model_name}@{choice.model_version})"
            if choice is not None
            else "nothing: no slot holds a bundle that verifies",
        )
        return choice

    def standby_name(self) -> str:
        """The slot that is not active ("a" when nothing is active)."""
        active = self.active()
        return "b" if active is not None and active.slot == "a" else "a"

    def load_order(self) -> list[SlotInfo]:
        """The active slot, then the other one if it holds a bundle: what to try at start."""
        active = self.active()
        if active is None:
            return []
        other = self.slot("b" if active.slot == "a" else "a")
        return [active] if other is None else [active, other]

    def stage(self, tar_path: Path, release: ReleaseInfo) -> SlotInfo:
        """Unpack the verified archive `tar_path` into the standby slot and record it.

        The active slot is never touched. The pointer is not changed: call `activate`.

        Raises:
            InstallError: BAD_ARCHIVE (unsafe or malformed tar) or BAD_BUNDLE (the unpacked
                directory does not verify); the standby slot is left empty.
        """

        def unpack(staging: Path) -> None:
            unpack_bundle(
                tar_path, staging, max_bytes=self._max_bundle_bytes, max_files=self._max_files
            )

        return self._install(self.standby_name(), unpack, release)

    def activate(self, name: str) -> SlotInfo:
        """Point at slot `name` (one atomic rename).

        Raises:
            ValueError: `name` is not "a" or "b".
            RuntimeError: the slot holds no staged bundle.
            InstallError: BAD_BUNDLE, its bundle no longer verifies; the pointer is kept.
        """
        slot = _check_slot(name)
        info = self.slot(slot)
        if info is None:
            raise RuntimeError(f"slot {slot} holds no staged bundle")
        _load(info.path)
        write_atomic(self._pointer, _Pointer(active=slot).model_dump_json().encode())
        return info

    def seed(self, bundle_dir: Path, release: ReleaseInfo) -> SlotInfo:
        """Install the factory bundle `bundle_dir` into slot a and point at it, if the store
        is empty; otherwise return the active slot unchanged.

        Raises:
            InstallError: BAD_BUNDLE, `bundle_dir` does not verify.
        """
        active = self.active()
        if active is not None:
            return active
        self._install("a", lambda staging: _copy_tree(bundle_dir, staging), release)
        return self.activate("a")

    def _install(self, name: str, fill: Callable[[Path], None], release: ReleaseInfo) -> SlotInfo:
        self._slots_dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        record_path = self._slots_dir / f"{name}.json"
        slot_dir = self._slots_dir / name
        # The record goes first: from here on the slot counts as empty.
        if record_path.exists():
            record_path.unlink()
            fsync_dir(self._slots_dir)
        if slot_dir.exists():
            trash = self.root / f".trash-{secrets.token_hex(6)}"
            slot_dir.rename(trash)
            fsync_dir(self._slots_dir)
            shutil.rmtree(trash)
        staging = self.root / f".staging-{secrets.token_hex(6)}"
        try:
            fill(staging)
            bundle = _load(staging)
            staging.rename(slot_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(self.root)
        fsync_dir(self._slots_dir)
        record = _SlotRecord(
            target_path=release.target_path,
            sha256=release.sha256,
            release_counter=release.release_counter,
            model_name=bundle.manifest.name,
            model_version=bundle.manifest.version,
        )
        write_atomic(record_path, record.model_dump_json().encode())
        info = self.slot(name)
        if info is None:
            raise RuntimeError(f"slot {name} vanished while it was being installed")
        return info

    def _recorded(self) -> list[SlotInfo]:
        return [info for name in SLOT_NAMES if (info := self.slot(name)) is not None]

    def _remove_leftovers(self) -> None:
        """Remove what a killed stage or document write left: directories being staged or
        thrown away, and ``write_atomic``'s temporary files."""
        for directory in (self.root, self._slots_dir):
            for entry in directory.iterdir():
                if entry.name.startswith((".staging-", ".trash-")) and entry.is_dir():
                    shutil.rmtree(entry)
                elif entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    entry.unlink()


def _check_slot(name: str) -> SlotName:
    for known in SLOT_NAMES:
        if name == known:
            return known
    raise ValueError(f"no slot named {name!r}: expected one of {SLOT_NAMES}")


def _read_document(path: Path, model: type[_DocumentT]) -> _DocumentT | None:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_DOCUMENT_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    if len(data) > MAX_DOCUMENT_BYTES:
        return None
    try:
        return model.model_validate_json(data)
    except ValidationError:
        return None


def _load(path: Path) -> Bundle:
    try:
        return load_bundle(path)
    except BundleError as e:
        raise InstallError(Reason.BAD_BUNDLE, f"{path.name}: {e}") from e


def _verifies(path: Path) -> bool:
    try:
        load_bundle(path)
    except BundleError:
        return False
    return True


def _copy_tree(source: Path, dest: Path) -> None:
    """Copy regular files and directories (no symlinks), fsync'ing everything."""
    dest.mkdir(mode=0o755)
    for dirpath, dirnames, filenames in os.walk(source):
        target = dest / Path(dirpath).relative_to(source)
        for name in dirnames:
            if (Path(dirpath) / name).is_symlink():
                raise InstallError(Reason.BAD_BUNDLE, f"{source}: {name} is a symbolic link")
            (target / name).mkdir(mode=0o755)
        for name in filenames:
            if (Path(dirpath) / name).is_symlink():
                raise InstallError(Reason.BAD_BUNDLE, f"{source}: {name} is a symbolic link")
            shutil.copyfile(Path(dirpath) / name, target / name)
            with (target / name).open("rb+") as f:
                os.fsync(f.fileno())
    for dirpath, _dirnames, _filenames in os.walk(dest, topdown=False):
        fsync_dir(Path(dirpath))
