"""The installers parse (bash -n) and pass shellcheck (installed by .ci/run)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
SHELL = ["install-agent.sh", "install-server.sh", "install-lib.sh"]


@pytest.mark.parametrize("name", SHELL)
def test_bash_parses(name: str) -> None:
    proc = subprocess.run(
        ["bash", "-n", str(SCRIPTS / name)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck is not None, "shellcheck not found: apt-get install shellcheck"
    proc = subprocess.run(
        [shellcheck, "-x", *(f"scripts/{n}" for n in SHELL)],
        cwd=SCRIPTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
