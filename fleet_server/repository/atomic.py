"""Atomic publishing of files: temp file in the same directory, fsync, rename, fsync dir.

Published files are served to devices as they are, so they are world-readable (0644).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edge_agent import durable

# Published files are served to devices: world-readable (mkstemp would make them 0600).
_PUBLISHED_MODE = 0o644


def stage_copy(source: Path, directory: Path) -> Path:
    """Copy ``source`` to a fsynced temp file in ``directory`` (for a later os.replace)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".staging-")
    staged = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            os.fchmod(out.fileno(), _PUBLISHED_MODE)
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def write_atomic(path: Path, data: bytes) -> None:
    """Publish ``data`` at ``path`` atomically, world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_atomic(path, data, mode=_PUBLISHED_MODE)
