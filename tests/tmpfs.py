"""A small tmpfs for disk-full tests. Mounting needs root, which the test machine and CI
have; without it the test fails with the reason instead of being skipped."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (e.g. "300k") at ``where`` (created), unmount after."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    assert mounted.returncode == 0, f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}"
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
