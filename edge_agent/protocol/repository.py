"""The signed repository's names, shared by the fleet server (which signs) and the device
(which verifies): role names, target namespaces and the assignment file (ADR 6).

Pure and stdlib-only.
"""

from __future__ import annotations

import json
from typing import Final

TARGETS_ROLE: Final = "targets"  # offline; signs nothing but the two delegations below
RELEASE_ROLE: Final = "release"  # signs models/*
DIRECTOR_ROLE: Final = "director"  # signs assignments/*
MODELS_PREFIX: Final = "models/"
ASSIGNMENTS_PREFIX: Final = "assignments/"
MODELS_PATTERN: Final = MODELS_PREFIX + "*"
ASSIGNMENTS_PATTERN: Final = ASSIGNMENTS_PREFIX + "*"


def assignment_bytes(device_id: str, target_path: str) -> bytes:
    """Canonical JSON content of an assignment (sorted keys, no spaces, UTF-8)."""
    document = {"device": device_id, "target": target_path}
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
