"""Writing files so that a crash or power cut leaves the old or the new content, never a
mix: temp file in the same directory, write, fsync, ``os.replace``, fsync the directory."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the directory entries of ``path`` (renames, new and removed files) durable."""
    if os.name == "nt":  # directories cannot be opened on Windows; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: this file system cannot sync directories
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically; the temp file is removed on failure.

    The file gets ``mode`` if given, else the umask's default (unlike ``mkstemp``, which
    would make every file private).
    """
    # A unique name: threads may write the same path.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
