"""Signing keys for the fleet repository: one ed25519 PEM file per key, per role.

Layout: ``<key_dir>/<role>-<n>.pem`` (PKCS#8, unencrypted), file mode 0600, directory mode
0700. The public key and key id are derived from the private key, so nothing else is stored.
Private keys never go into the repository's metadata or targets directories.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key

# securesystemslib.signer re-exports these without __all__, which mypy --strict flags; the
# resolved types are the real ones.
from securesystemslib.signer import CryptoSigner, Signer  # type: ignore[attr-defined]

from edge_agent.durable import fsync_dir
from fleet_server.repository.errors import RepositoryError

# Role name -> number of keys (ADR 6). "targets" is the thin offline top-level role that only
# delegates; "release" (ML team) signs models/*, "director" (online, on the fleet server)
# signs assignments/*.
ROLE_KEY_COUNTS: dict[str, int] = {
    "root": 3,
    "targets": 1,
    "release": 1,
    "director": 1,
    "snapshot": 1,
    "timestamp": 1,
}

_DIR_MODE = 0o700
_FILE_MODE = 0o600


def init_keys(key_dir: Path) -> None:
    """Create fresh ed25519 keys for every role in ``ROLE_KEY_COUNTS`` under ``key_dir``.

    ``key_dir`` is created with mode 0700 (its parents as needed); each key file gets 0600.

    Raises:
        RepositoryError: ``key_dir`` exists and is not an empty directory (keys are never
            overwritten or mixed with other files).
    """
    if key_dir.exists():
        if not key_dir.is_dir():
            raise RepositoryError(f"key directory {key_dir} exists and is not a directory")
        if any(key_dir.iterdir()):
            raise RepositoryError(
                f"key directory {key_dir} is not empty; refusing to create keys there"
            )
    key_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    # mkdir's mode is filtered by the umask, and an existing empty dir keeps its mode.
    key_dir.chmod(_DIR_MODE)
    for role, count in ROLE_KEY_COUNTS.items():
        for index in range(1, count + 1):
            signer = CryptoSigner.generate_ed25519()
            _write_private_file(key_dir / f"{role}-{index}.pem", signer.private_bytes)
    fsync_dir(key_dir)


def load_signers(key_dir: Path, role: str) -> list[Signer]:
    """Load every private key of ``role`` from ``key_dir``, in file-name order.

    Raises:
        RepositoryError: no key file for ``role``, or a key file that is not an
            unencrypted PEM private key.
    """
    paths = sorted(key_dir.glob(f"{role}-*.pem"))
    if not paths:
        raise RepositoryError(f"no keys for role {role!r} in {key_dir}")
    signers: list[Signer] = []
    for path in paths:
        try:
            private_key = load_pem_private_key(path.read_bytes(), password=None)
            signers.append(CryptoSigner(private_key))
        except (ValueError, TypeError) as e:
            raise RepositoryError(f"cannot load private key {path}: {e}") from e
    return signers


def _write_private_file(path: Path, data: bytes) -> None:
    # O_EXCL: never overwrite a key; the mode is set at creation so the key is never
    # readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), _FILE_MODE)
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
