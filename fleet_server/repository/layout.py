"""The repository's layout: role names, delegation patterns, target paths, lifetimes.

Pure: names and rules shared by the signing code and the server's CLI (ADR 6).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

# tuf re-exports these names without __all__, which mypy --strict flags; the resolved
# types are the real ones.
from tuf.api.metadata import Root, Snapshot, TargetFile, Timestamp  # type: ignore[attr-defined]

from edge_agent.protocol.repository import DIRECTOR_ROLE, RELEASE_ROLE, TARGETS_ROLE
from fleet_server.repository.errors import RepositoryError

ROOT_THRESHOLD = 2

# Names, versions and device ids become one path segment: the director's pattern
# "assignments/*" matches exactly one segment (python-tuf globs each "/" part separately).
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")


@dataclass(frozen=True, slots=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    # The top-level targets role is offline and only delegates: re-signed as rarely as root.
    targets: timedelta = timedelta(days=365)
    release: timedelta = timedelta(days=30)
    director: timedelta = timedelta(days=30)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def lifetime(self, role: str) -> timedelta:
        """How long ``role``'s metadata is valid once signed.

        Raises:
            ValueError: ``role`` is not one of the repository's roles.
        """
        lifetimes = {
            Root.type: self.root,
            TARGETS_ROLE: self.targets,
            RELEASE_ROLE: self.release,
            DIRECTOR_ROLE: self.director,
            Snapshot.type: self.snapshot,
            Timestamp.type: self.timestamp,
        }
        if role not in lifetimes:
            raise ValueError(f"unknown role {role!r}")
        return lifetimes[role]

    def expires(self, role: str, now: datetime) -> datetime:
        """Expiry for ``role`` signed at ``now`` (an aware datetime), in UTC.

        Raises:
            ValueError: ``now`` is naive, or ``role`` is unknown.
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        return now.astimezone(timezone.utc) + self.lifetime(role)

    def due(self, role: str, expires: datetime, now: datetime) -> bool:
        """True when less than half of ``role``'s lifetime remains at ``now``.

        Raises:
            ValueError: ``now`` or ``expires`` is naive, or ``role`` is unknown.
        """
        if now.tzinfo is None or expires.tzinfo is None:
            raise ValueError("now and expires must be timezone-aware")
        return expires - now < self.lifetime(role) / 2


def release_path(name: str, version: str) -> str:
    """Target path of a model bundle: ``models/<name>-<version>.tar``."""
    return f"models/{name}-{version}.tar"


def assignment_path(device_id: str) -> str:
    """Target path of a device's assignment: ``assignments/<device_id>``."""
    return f"assignments/{device_id}"


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


def check_segment(what: str, value: str) -> None:
    """Refuse ``value`` as one path segment (a name, version or device id).

    Raises:
        RepositoryError: not 1-128 of ``A-Z a-z 0-9 . _ + -``, starting with a letter or
            digit.
    """
    if not _SEGMENT_RE.match(value):
        raise RepositoryError(
            f"invalid {what} {value!r}: use letters, digits, '.', '_', '+', '-' (max 128)"
        )


def release_custom(
    counter: int | None, runtime: str, profiles: list[str], name: str, version: str
) -> dict[str, Any]:
    """The ``custom`` fields of a release target."""
    return {
        "release_counter": counter,
        "runtime": runtime,
        "profiles": list(profiles),
        "model": name,
        "version": version,
    }
