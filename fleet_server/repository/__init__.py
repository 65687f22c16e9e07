"""TUF repository for fleet updates: keys, roles, signing and publishing metadata.

Roles: ``root`` (offline, 2 of 3), ``targets`` (the release role: which model bundles exist),
``director`` (delegated from ``targets`` for ``assignments/*``: what each device runs),
``snapshot`` and ``timestamp`` (online).
"""

from fleet_server.repository.errors import RepositoryError
from fleet_server.repository.keys import ROLE_KEY_COUNTS, init_keys, load_signers
from fleet_server.repository.repo import (
    ASSIGNMENTS_PATTERN,
    DIRECTOR_ROLE,
    RELEASE_ROLE,
    ExpiryPolicy,
    FleetRepository,
    assignment_path,
    release_path,
)

__all__ = [
    "ASSIGNMENTS_PATTERN",
    "DIRECTOR_ROLE",
    "RELEASE_ROLE",
    "ROLE_KEY_COUNTS",
    "ExpiryPolicy",
    "FleetRepository",
    "RepositoryError",
    "assignment_path",
    "init_keys",
    "load_signers",
    "release_path",
]
