"""Releasing a model bundle: verify it, pack it deterministically, sign it into ``release``.

Shared by ``fleet-server release`` and the demo, so both release exactly the same way.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from edge_agent.bundle import load_bundle
from edge_agent.config import profile_search_path
from edge_agent.update.unpack import pack_bundle
from fleet_server.compatibility import find_profiles, release_profiles
from fleet_server.repository import FleetRepository, release_path


@dataclass(frozen=True, slots=True)
class Released:
    target_path: str
    model: str  # name@version
    release_counter: int
    runtime: str
    profiles: tuple[str, ...]


def release_bundle(
    fleet: FleetRepository,
    bundle_dir: Path,
    *,
    now: datetime,
    profiles: list[str] | None = None,
) -> Released:
    """Release the bundle in ``bundle_dir`` for ``profiles`` (None: every known profile
    with the bundle's runtime).

    Raises:
        BundleError: the bundle does not verify.
        ValueError: a file name or type a device would refuse to unpack.
        CompatibilityError: a requested profile is unknown or lacks the runtime.
        RepositoryError: the release cannot be signed (see ``FleetRepository.add_release``).
        OSError: the bundle cannot be read.
    """
    # Verified first: pack_bundle archives the directory as it is.
    manifest = load_bundle(bundle_dir).manifest
    runtime = manifest.runtime.value
    names = release_profiles(runtime, find_profiles(profile_search_path()), profiles)
    with tempfile.TemporaryDirectory(prefix="fleet-release-") as tmp:
        tar = Path(tmp) / "bundle.tar"
        pack_bundle(bundle_dir, tar)
        counter = fleet.add_release(
            manifest.name, manifest.version, tar, runtime=runtime, profiles=names, now=now
        )
    return Released(
        target_path=release_path(manifest.name, manifest.version),
        model=f"{manifest.name}@{manifest.version}",
        release_counter=counter,
        runtime=runtime,
        profiles=tuple(names),
    )
