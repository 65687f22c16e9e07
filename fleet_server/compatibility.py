"""Which firmware profiles a release is for, and whether a device may be assigned one.

A release carries its runtime (from the bundle manifest) and the names of the firmware
profiles it is built for. A profile qualifies when its ``runtimes`` include the release's
runtime. By default a release is for every known profile that qualifies; an operator may
narrow that list, never widen it past the runtime.

The checks are pure; ``find_profiles`` is the one function that reads files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from edge_agent.config import FirmwareProfile, load_profile


class CompatibilityError(Exception):
    """A release or an assignment does not fit the named firmware profile(s)."""


def find_profiles(search: Iterable[Path]) -> dict[str, FirmwareProfile]:
    """Every firmware profile (``*.toml``) in the ``search`` directories, by name.

    The first directory that has a profile of a given file name wins, as in
    ``edge_agent.config.load_profile``; missing directories are skipped.

    Raises:
        ConfigError: a profile file is invalid (names the file and key).
    """
    found: dict[str, FirmwareProfile] = {}
    for directory in search:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            if path.stem not in found:
                found[path.stem] = load_profile(str(path))
    return {profile.name: profile for profile in found.values()}


def release_profiles(
    runtime: str, known: Mapping[str, FirmwareProfile], requested: Iterable[str] | None = None
) -> list[str]:
    """Sorted names of the profiles a ``runtime`` release is for.

    Args:
        runtime: the bundle's runtime (``onnx``, ``tflite``).
        known: every profile the server knows, by name.
        requested: the operator's list; None means every known profile that has
            ``runtime``.

    Raises:
        CompatibilityError: a requested profile is unknown or lacks ``runtime``, or no
            profile qualifies.
    """
    if requested is None:
        names = [name for name, profile in known.items() if runtime in profile.runtimes]
        if not names:
            raise CompatibilityError(f"no known firmware profile supports runtime {runtime!r}")
        return sorted(names)
    names = sorted(set(requested))
    if not names:
        raise CompatibilityError("the list of profiles is empty")
    for name in names:
        profile = known.get(name)
        if profile is None:
            raise CompatibilityError(
                f"unknown firmware profile {name!r} (known: {', '.join(sorted(known))})"
            )
        if runtime not in profile.runtimes:
            raise CompatibilityError(
                f"firmware profile {name!r} has runtimes {', '.join(profile.runtimes)}, "
                f"not {runtime!r}"
            )
    return names


def check_assignment(model_id: str, custom: object, profile: FirmwareProfile) -> None:
    """Refuse assigning release ``model_id`` (its target ``custom`` fields) to a device
    with ``profile``.

    Raises:
        CompatibilityError: the release has no runtime/profiles fields, its profile list
            lacks ``profile``, or ``profile`` lacks its runtime.
    """
    if not isinstance(custom, Mapping):
        raise CompatibilityError(f"release {model_id} has no runtime or profile fields")
    runtime = custom.get("runtime")
    profiles = custom.get("profiles")
    if not isinstance(runtime, str) or not isinstance(profiles, list):
        raise CompatibilityError(f"release {model_id} has no runtime or profile fields")
    if profile.name not in profiles:
        listed = ", ".join(str(p) for p in profiles) or "none"
        raise CompatibilityError(
            f"release {model_id} is not for firmware profile {profile.name!r} "
            f"(released for: {listed})"
        )
    if runtime not in profile.runtimes:
        raise CompatibilityError(
            f"release {model_id} needs runtime {runtime!r}; firmware profile "
            f"{profile.name!r} has {', '.join(profile.runtimes)}"
        )
