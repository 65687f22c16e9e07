"""scripts/install-agent.sh and install-server.sh, run for real into a throwaway root
(``--destdir``; no users or systemctl there), from a wheel of this checkout.

A full install (users, ownership, udev rule, daemon-reload) needs root and a machine that
runs systemd; docs/operations.md says how to check one.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from edge_agent import __version__
from fleet_server.enroll import StarterConfig, enroll_device
from tests.integration.reference import ONNX_BUNDLE

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
PREFIX = "/opt/ef-test"
OFFLINE = ["--pip-args", "--no-index --no-deps"]


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout's two packages with their console scripts, built here
    without network or build backend (pip installs it with --no-deps --no-index)."""
    out = tmp_path_factory.mktemp("wheel") / f"edgefleet-{__version__}-py3-none-any.whl"
    info = f"edgefleet-{__version__}.dist-info"
    files: dict[str, bytes] = {}
    for package in ("edge_agent", "fleet_server"):
        for path in sorted((ROOT / package).rglob("*.py")):
            files[path.relative_to(ROOT).as_posix()] = path.read_bytes()
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: edgefleet\nVersion: {__version__}\n"
    ).encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{info}/entry_points.txt"] = (
        b"[console_scripts]\nedge-agent = edge_agent.cli:main\n"
        b"fleet-server = fleet_server.cli:main\n"
    )
    record = [f"{name},{_record_hash(data)},{len(data)}" for name, data in files.items()]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out


def run_script(name: str, *args: str) -> str:
    """Run an installer; it must succeed. Returns what it printed."""
    proc = subprocess.run(
        ["bash", str(SCRIPTS / name), *args, "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def tree(root: Path, *parts: str) -> dict[str, tuple[int, str]]:
    """Mode and sha256 of every file and directory under ``root/parts...``."""
    out: dict[str, tuple[int, str]] = {}
    for base in parts:
        for path in sorted((root / base).rglob("*")):
            data = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            out[path.relative_to(root).as_posix()] = (path.stat().st_mode & 0o7777, data)
    return out


def unit_of(source: Path, prefix: str) -> str:
    return source.read_text(encoding="utf-8").replace("/opt/edgefleet/", prefix + "/")


def test_help_and_bad_option() -> None:
    for name in ("install-agent.sh", "install-server.sh"):
        proc = subprocess.run(
            ["bash", str(SCRIPTS / name), "--help"], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0 and proc.stdout.startswith(f"Usage: {name}"), proc.stderr
        assert "root and systemd" in proc.stdout
        proc = subprocess.run(
            ["bash", str(SCRIPTS / name), "--frobnicate"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 2
        assert "unknown option '--frobnicate'" in proc.stderr


def test_install_agent_into_a_throwaway_root(wheel: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    args = ["--destdir", str(dest), "--prefix", PREFIX, "--wheel", str(wheel), *OFFLINE]
    said = run_script("install-agent.sh", *args)
    assert "skipped: systemctl daemon-reload" in said
    venv = dest / PREFIX.lstrip("/")
    for script in ("edge-agent", "fleet-server"):
        exe = venv / "bin" / script
        assert os.access(exe, os.X_OK), exe
        assert exe.read_text().splitlines()[0] == f"#!{venv}/bin/python"
    probe = subprocess.run(
        [venv / "bin" / "python", "-c", "import edge_agent.systemd, importlib.metadata as m;"
         "print(m.version('edgefleet'))"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert probe.stdout.strip() == __version__, probe.stderr
    model = f"{PREFIX}/share/edgefleet/models/reference-onnx"
    assert (dest / model.lstrip("/") / "bundle.json").is_file()
    config = (dest / "etc/edge-agent/agent.toml").read_text()
    assert f'bundle = "{model}"' in config
    assert (dest / "var/lib/edge-agent").stat().st_mode & 0o777 == 0o750
    unit = (dest / "etc/systemd/system/edge-agent.service").read_text()
    assert unit == unit_of(SCRIPTS / "systemd" / "edge-agent.service", PREFIX)
    assert f"ExecStart={PREFIX}/bin/edge-agent run --config /etc/edge-agent/agent.toml" in unit

    # Again, with an edited config: same tree, the operator's config is kept.
    (dest / "etc/edge-agent/agent.toml").write_text(config + "# edited\n")
    before = tree(dest, "etc", "var", PREFIX.lstrip("/") + "/share")
    said = run_script("install-agent.sh", *args)
    assert "kept existing /etc/edge-agent/agent.toml" in said
    assert "creating venv" not in said
    assert tree(dest, "etc", "var", PREFIX.lstrip("/") + "/share") == before

    # A provisioning bundle from `fleet-server devices enroll` becomes the config.
    shutil.rmtree(dest / "etc/edge-agent")
    repo = tmp_path / "repo"
    (repo / "metadata").mkdir(parents=True)
    (repo / "metadata" / "1.root.json").write_bytes(b'{"signed": {}}')
    bundle = tmp_path / "line-7.tar.gz"
    enroll_device(
        "line-7",
        ca_dir=tmp_path / "ca",
        repo=repo,
        out=bundle,
        starter=StarterConfig(broker="fleet.example:8883", model=ONNX_BUNDLE),
        now=datetime.now(timezone.utc),
    )
    run_script("install-agent.sh", *args, "--bundle", str(bundle))
    etc = dest / "etc/edge-agent"
    assert 'id = "line-7"' in (etc / "agent.toml").read_text()
    assert (etc / "root.json").read_bytes() == b'{"signed": {}}'
    assert (etc / "tls/device.key").stat().st_mode & 0o777 == 0o640
    assert (etc / "tls/device.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_install_server_into_a_throwaway_root(wheel: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    args = ["--destdir", str(dest), "--wheel", str(wheel), "--extras", "", *OFFLINE]
    said = run_script("install-server.sh", *args, "--mosquitto")
    assert "skipped: systemctl daemon-reload" in said
    venv = dest / "opt/edgefleet"
    env_file = dest / "etc/fleet-server/fleet-server.env"
    assert env_file.stat().st_mode & 0o777 == 0o640
    assert env_file.read_bytes() == (SCRIPTS / "systemd" / "fleet-server.env").read_bytes()
    assert (dest / "etc/fleet-server").stat().st_mode & 0o777 == 0o750
    assert (dest / "var/lib/fleet-server").stat().st_mode & 0o777 == 0o750
    conf = dest / "etc/mosquitto/conf.d/edgefleet.conf"
    assert conf.read_bytes() == (SCRIPTS / "mosquitto" / "mosquitto.conf").read_bytes()
    assert (dest / "etc/mosquitto/edgefleet.acl").read_bytes() == (
        SCRIPTS / "mosquitto" / "acl"
    ).read_bytes()
    unit = dest / "etc/systemd/system/fleet-server.service"
    assert unit.read_text() == (SCRIPTS / "systemd" / "fleet-server.service").read_text()

    # The installed unit, pointed at this root's files, passes systemd-analyze verify.
    check = tmp_path / "fleet-server.service"
    check.write_text(
        unit.read_text()
        .replace("/opt/edgefleet/", f"{venv}/")
        .replace("/etc/fleet-server/", f"{dest}/etc/fleet-server/")
    )
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(check)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr

    before = tree(dest, "etc", "var")
    said = run_script("install-server.sh", *args, "--mosquitto")
    assert "kept existing /etc/fleet-server/fleet-server.env" in said
    assert tree(dest, "etc", "var") == before
