"""TUF repository for fleet updates: keys, roles, signing and publishing metadata.

Roles (ADR 6): ``root`` (offline, 2 of 3); ``targets`` (offline, lists no targets, only
delegates); ``release`` (delegated for ``models/*``, terminating: which model bundles
exist); ``director`` (delegated for ``assignments/*``, terminating: what each device runs);
``snapshot`` and ``timestamp`` (online).
"""

from edge_agent.protocol.repository import (
    ASSIGNMENTS_PATTERN,
    DIRECTOR_ROLE,
    MODELS_PATTERN,
    RELEASE_ROLE,
    TARGETS_ROLE,
)
from fleet_server.repository.errors import RepositoryError
from fleet_server.repository.keys import ROLE_KEY_COUNTS, init_keys, load_signers
from fleet_server.repository.layout import (
    ExpiryPolicy,
    assignment_path,
    release_path,
)
from fleet_server.repository.repo import FleetRepository

__all__ = [
    "ASSIGNMENTS_PATTERN",
    "DIRECTOR_ROLE",
    "MODELS_PATTERN",
    "RELEASE_ROLE",
    "ROLE_KEY_COUNTS",
    "TARGETS_ROLE",
    "ExpiryPolicy",
    "FleetRepository",
    "RepositoryError",
    "assignment_path",
    "init_keys",
    "load_signers",
    "release_path",
]
