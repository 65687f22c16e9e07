"""What the device may install: python-tuf's verification plus Uptane's two-role check.

``TrustClient.check`` runs ``tuf.ngclient.Updater`` (every TUF check: signatures and
thresholds, versions never going back, expiry, snapshot consistency, length caps) and then
the checks TUF cannot know about, as pure functions of trusted data:

- the assignment ``assignments/<device>`` is signed by the **director** role and names this
  device (``parse_assignment``);
- the bundle it names is a ``models/...`` target signed by the **release** role, built for
  a runtime this device has and a profile list that includes this device's profile, with a
  release counter not lower than the one installed for that model (``check_release``).

Roles come from the trusted metadata the Updater has just verified and stored: a target is
accepted only if the expected role lists it with the same length and hashes.

A refused update leaves the trust state byte for byte as it was: the Updater works on a
copy of the trusted metadata (``trust_dir/gen-N``), and the copy becomes the trusted set
(an atomic switch of the ``trust_dir/current`` symlink) only when every check has passed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, TargetFile, Targets  # type: ignore[attr-defined]
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from edge_agent.durable import fsync_dir
from edge_agent.protocol.repository import (
    ASSIGNMENTS_PREFIX,
    DIRECTOR_ROLE,
    MODELS_PREFIX,
    RELEASE_ROLE,
)
from edge_agent.update.errors import Reason, TransferError, TrustError

MAX_ASSIGNMENT_BYTES = 4096
METADATA_BASE_URL = "mqtt:metadata/"
TARGET_BASE_URL = "mqtt:targets/"
# Metadata size caps (bytes), enforced while streaming by python-tuf.
UPDATER_CONFIG = UpdaterConfig(
    max_root_rotations=32,
    max_delegations=8,
    root_max_length=64 * 1024,
    timestamp_max_length=4 * 1024,
    snapshot_max_length=64 * 1024,
    targets_max_length=1024 * 1024,
)

log = logging.getLogger("edge_agent.update")


@dataclass(frozen=True, slots=True)
class Assignment:
    """The director's word: ``device`` should run the bundle at ``target``."""

    device: str
    target: str


@dataclass(frozen=True, slots=True)
class Release:
    """A release-signed model bundle, with the fields the device checks."""

    path: str
    length: int
    sha256: str
    counter: int
    runtime: str
    profiles: tuple[str, ...]
    model: str
    version: str


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the device is: checked against every release it is offered."""

    device_id: str
    profile: str
    runtimes: frozenset[str]


def parse_assignment(data: bytes, device_id: str) -> Assignment:
    """Parse a verified assignment file and check it is for ``device_id``.

    Raises:
        TrustError: WRONG_DEVICE if it names another device; METADATA if it is malformed.
    """
    if len(data) > MAX_ASSIGNMENT_BYTES:
        raise TrustError(Reason.METADATA, f"assignment of {len(data)} bytes is too large")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise TrustError(Reason.METADATA, f"assignment is not JSON: {e}") from e
    if not isinstance(document, dict) or set(document) != {"device", "target"}:
        raise TrustError(Reason.METADATA, "assignment must be {device, target}")
    device, target = document["device"], document["target"]
    if not isinstance(device, str) or not isinstance(target, str):
        raise TrustError(Reason.METADATA, "assignment fields must be strings")
    if device != device_id:
        raise TrustError(
            Reason.WRONG_DEVICE, f"assignment names device {device!r}, this is {device_id!r}"
        )
    if not target.startswith(MODELS_PREFIX):
        raise TrustError(Reason.NOT_RELEASED, f"assignment points outside models/: {target!r}")
    return Assignment(device, target)


def release_of(target: TargetFile) -> Release:
    """The release fields of a ``models/...`` target.

    Raises:
        TrustError: NOT_RELEASED if the custom fields are missing or malformed.
    """
    custom = target.custom
    sha256 = target.hashes.get("sha256")
    if not isinstance(custom, dict) or sha256 is None:
        raise TrustError(Reason.NOT_RELEASED, f"{target.path} has no release fields or sha256")
    counter = custom.get("release_counter")
    runtime = custom.get("runtime")
    profiles = custom.get("profiles")
    model = custom.get("model")
    version = custom.get("version")
    if (
        type(counter) is not int
        or not isinstance(runtime, str)
        or not isinstance(profiles, list)
        or not all(isinstance(p, str) for p in profiles)
        or not isinstance(model, str)
        or not isinstance(version, str)
    ):
        raise TrustError(Reason.NOT_RELEASED, f"{target.path} has malformed release fields")
    return Release(
        path=target.path,
        length=target.length,
        sha256=sha256,
        counter=counter,
        runtime=runtime,
        profiles=tuple(profiles),
        model=model,
        version=version,
    )


def check_release(
    release: Release,
    device: DeviceFacts,
    installed_counters: Mapping[str, int],
    blocklist: Mapping[str, str],
) -> None:
    """Uptane's device-side release checks, on already verified data.

    Raises:
        TrustError: BLOCKLISTED, INCOMPATIBLE (runtime or profile), COUNTER_ROLLBACK.
    """
    if release.sha256 in blocklist:
        raise TrustError(
            Reason.BLOCKLISTED,
            f"{release.path} ({release.sha256[:12]}) is blocklisted: {blocklist[release.sha256]}",
        )
    if release.runtime not in device.runtimes:
        raise TrustError(
            Reason.INCOMPATIBLE,
            f"{release.path} needs runtime {release.runtime!r}; this device has "
            f"{sorted(device.runtimes)}",
        )
    if device.profile not in release.profiles:
        raise TrustError(
            Reason.INCOMPATIBLE,
            f"{release.path} is released for profiles {list(release.profiles)}, "
            f"not {device.profile!r}",
        )
    installed = installed_counters.get(release.model)
    if installed is not None and release.counter < installed:
        raise TrustError(
            Reason.COUNTER_ROLLBACK,
            f"{release.path} has release counter {release.counter}, lower than the "
            f"installed {installed}",
        )


def signed_by(role_md: Metadata[Targets], target: TargetFile) -> bool:
    """True if ``role_md`` lists ``target`` with the same length, hashes and fields."""
    listed = role_md.signed.targets.get(target.path)
    return listed is not None and listed == target


class TrustClient:
    """The device's TUF client: metadata over a given fetcher, trust state in ``trust_dir``.

    Args:
        trust_dir: the Updater's metadata cache (trusted, verified metadata only).
        bootstrap_root: the root metadata pinned at provisioning.
        fetcher: how files arrive (`MqttFetcher` in production).
        device: this device's id, profile and runtimes.
    """

    def __init__(
        self,
        trust_dir: Path,
        bootstrap_root: bytes,
        fetcher: FetcherInterface,
        device: DeviceFacts,
    ) -> None:
        self.trust_dir = trust_dir
        self._bootstrap = bootstrap_root
        self._fetcher = fetcher
        self.device = device
        self._uncommitted: Path | None = None

    def check(
        self,
        now: datetime,
        installed_counters: Mapping[str, int],
        blocklist: Mapping[str, str],
        *,
        commit: bool = True,
    ) -> Release | None:
        """Refresh metadata at time ``now`` and return the release assigned to this
        device, or None if there is no assignment.

        With ``commit=False`` the verified metadata is kept aside until ``commit`` (the
        update was installed, or there was nothing to install) or ``discard`` (the update
        was refused later: bad bytes, failed gate); the trust state changes only then.

        ``now`` is the device's trusted time (never earlier than any time it has seen),
        used for every expiry check instead of the wall clock.

        Raises:
            TrustError: any metadata or two-role check failed (trust state on disk keeps
                only metadata that verified).
            TransferError: TRANSPORT when the server did not answer.
        """
        self.discard()
        work = self._begin()
        try:
            release = self._check_in(work, now, installed_counters, blocklist)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        if commit:
            self._commit(work)
        else:
            self._uncommitted = work
        return release

    def commit(self) -> None:
        """Make the metadata of the last ``check(commit=False)`` the trusted set."""
        work, self._uncommitted = self._uncommitted, None
        if work is None:
            raise RuntimeError("nothing to commit: call check(commit=False) first")
        self._commit(work)

    def discard(self) -> None:
        """Drop the metadata of the last ``check(commit=False)``; the trust state stays."""
        work, self._uncommitted = self._uncommitted, None
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)

    def trusted_dir(self) -> Path | None:
        """The directory holding the trusted metadata, or None before the first check."""
        current = self.trust_dir / "current"
        return current.resolve() if current.is_symlink() else None

    def trusted_timestamp_version(self) -> int:
        """The version of the trusted timestamp metadata (0 before the first check)."""
        trusted = self.trusted_dir()
        if trusted is None:
            return 0
        try:
            md: Metadata[Any] = Metadata.from_file(str(trusted / "timestamp.json"))
        except (OSError, ValueError):
            return 0
        return int(md.signed.version)

    def _begin(self) -> Path:
        """A fresh copy of the trusted metadata to run the Updater on."""
        self.trust_dir.mkdir(parents=True, exist_ok=True)
        trusted = self.trusted_dir()
        for stale in self.trust_dir.glob("gen-*"):
            if stale not in (trusted, self._uncommitted):  # left by a crash before a commit
                shutil.rmtree(stale, ignore_errors=True)
        generation = 1 if trusted is None else int(trusted.name.removeprefix("gen-")) + 1
        work = self.trust_dir / f"gen-{generation}"
        if trusted is None:
            work.mkdir()
        else:
            shutil.copytree(trusted, work, symlinks=True)
        return work

    def _commit(self, work: Path) -> None:
        """Make ``work`` the trusted set: fsync its files, then switch the symlink."""
        for path in work.rglob("*"):
            if path.is_file() and not path.is_symlink():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(work)
        old = self.trusted_dir()
        link = self.trust_dir / "current"
        tmp = self.trust_dir / "current.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(work.name, tmp)
        os.replace(tmp, link)
        fsync_dir(self.trust_dir)
        if old is not None and old != work:
            shutil.rmtree(old, ignore_errors=True)

    def _check_in(
        self,
        work: Path,
        now: datetime,
        installed_counters: Mapping[str, int],
        blocklist: Mapping[str, str],
    ) -> Release | None:
        try:
            updater = Updater(
                metadata_dir=str(work),
                metadata_base_url=METADATA_BASE_URL,
                target_base_url=TARGET_BASE_URL,
                fetcher=self._fetcher,
                config=UPDATER_CONFIG,
                bootstrap=self._bootstrap,
            )
            # python-tuf reads the wall clock once, when the trusted set is built; the
            # device's clock may have been set backwards, so expiry uses trusted time.
            updater._trusted_set.reference_time = now
            updater.refresh()
            path = ASSIGNMENTS_PREFIX + self.device.device_id
            assigned = updater.get_targetinfo(path)
            if assigned is None:
                return None
            self._require_role(work, DIRECTOR_ROLE, assigned)
            data = self._download_small(assigned)
            assignment = parse_assignment(data, self.device.device_id)
            target = updater.get_targetinfo(assignment.target)
            if target is None:
                raise TrustError(
                    Reason.NOT_RELEASED, f"assigned {assignment.target} is not released"
                )
            self._require_role(work, RELEASE_ROLE, target)
        except tuf_errors.DownloadLengthMismatchError as e:
            # Longer than the signed length or the metadata size cap: the server lies.
            raise TrustError(Reason.METADATA, f"oversized download refused: {e}") from e
        except tuf_errors.DownloadError as e:
            raise TransferError(Reason.TRANSPORT, f"metadata download failed: {e}") from e
        except tuf_errors.RepositoryError as e:
            raise TrustError(Reason.METADATA, f"{type(e).__name__}: {e}") from e
        except (ValueError, KeyError, TypeError) as e:
            # Malformed metadata that python-tuf reports as a plain error.
            raise TrustError(Reason.METADATA, f"malformed metadata: {e}") from e
        release = release_of(target)
        check_release(release, self.device, installed_counters, blocklist)
        return release

    @staticmethod
    def _require_role(work: Path, role: str, target: TargetFile) -> None:
        """The target must be listed by ``role`` itself (not by any other role)."""
        path = work / f"{role}.json"
        try:
            md: Metadata[Any] = Metadata.from_file(str(path))
        except (OSError, ValueError) as e:
            raise TrustError(Reason.METADATA, f"no trusted {role} metadata: {e}") from e
        if not isinstance(md.signed, Targets) or not signed_by(md, target):
            reason = Reason.NOT_RELEASED if role == RELEASE_ROLE else Reason.NO_ASSIGNMENT
            raise TrustError(reason, f"{target.path} is not signed by the {role} role")

    def _download_small(self, target: TargetFile) -> bytes:
        if target.length > MAX_ASSIGNMENT_BYTES:
            raise TrustError(Reason.METADATA, f"{target.path} is {target.length} bytes")
        with self._fetcher.download_file(TARGET_BASE_URL + target.path, target.length) as f:
            target.verify_length_and_hashes(f)
            f.seek(0)
            data: bytes = f.read()
        return data
