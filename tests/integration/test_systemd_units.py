"""scripts/systemd/*.service: `systemd-analyze verify` (no warnings), the sandbox's
exposure score, the settings the agent relies on, and ExecStart lines that the CLIs
accept. Broken units must be caught by the same check."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.cli import _parser as agent_parser
from fleet_server.cli import _parser as server_parser

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "scripts" / "systemd"
BIN = Path(sys.executable).parent  # this venv's edge-agent and fleet-server scripts


def settings(unit: Path) -> dict[tuple[str, str], list[str]]:
    """``(section, key) -> values`` of a unit file (keys may repeat)."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in unit.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key), []).append(value)
    return out


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {k: v for k, v in (p for p in pairs if len(p) == 2) if not k.startswith("#")}


def runnable(unit: Path, tmp: Path) -> Path:
    """The unit with its binaries and environment file moved to where they exist here
    (verify checks that ExecStart is executable)."""
    env = tmp / "fleet-server.env"
    env.write_bytes((UNITS / "fleet-server.env").read_bytes())
    text = unit.read_text(encoding="utf-8").replace("/opt/edgefleet/bin/", f"{BIN}/")
    text = text.replace("/etc/fleet-server/fleet-server.env", str(env))
    out = tmp / unit.name
    out.write_text(text, encoding="utf-8")
    return out


def verify(unit: Path) -> str:
    """Everything `systemd-analyze verify` objects to ("" for a clean unit): unknown keys
    and unparsable values are only warnings there, so they count as failures here."""
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = proc.stderr.strip()
    if proc.returncode != 0 and not problems:
        problems = f"exit {proc.returncode}"
    return problems


@pytest.mark.parametrize("name", ["edge-agent.service", "fleet-server.service"])
def test_units_verify_clean(name: str, tmp_path: Path) -> None:
    unit = runnable(UNITS / name, tmp_path)
    assert verify(unit) == ""
    # Exposure score 0 (locked down) .. 10 (unprotected); the sandbox must stay <= 3.0.
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=30", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr


BROKEN = {
    "misspelt key": ("WatchdogSec=30", "WatchdogSecs=30"),
    "bad service type": ("Type=notify", "Type=notifyy"),
    "missing binary": ("/bin/edge-agent run", "/bin/no-such-agent run"),
    "relative ExecStart": ("ExecStart=/", "ExecStart="),
    "misspelt section": ("[Service]", "[Servce]"),
    "bad restart policy": ("Restart=on-failure", "Restart=sometimes"),
}


@pytest.mark.parametrize("change", BROKEN.values(), ids=BROKEN.keys())
def test_broken_unit_is_caught(change: tuple[str, str], tmp_path: Path) -> None:
    good = runnable(UNITS / "edge-agent.service", tmp_path)
    old, new = change
    text = good.read_text()
    assert old in text
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace(old, new, 1))
    assert verify(broken) != ""


def test_agent_unit_settings() -> None:
    s = settings(UNITS / "edge-agent.service")
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "User": "edge-agent",
        "StateDirectory": "edge-agent",
        "ConfigurationDirectory": "edge-agent",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "NoNewPrivileges": "true",
        "SupplementaryGroups": "video gpio",
    }
    for key, value in expected.items():
        assert s[("Service", key)] == [value], key
    # Pinged every half interval by the loop; 30 s outlasts the slowest frame by far.
    assert int(s[("Service", "WatchdogSec")][0]) >= 10
    # These would hide /dev/video* and /dev/gpiochip* from the agent.
    for key in ("PrivateDevices", "ProtectClock", "DevicePolicy", "DeviceAllow"):
        assert ("Service", key) not in s, key
    argv = shlex.split(s[("Service", "ExecStart")][0])
    assert argv[0] == "/opt/edgefleet/bin/edge-agent"
    args = agent_parser().parse_args(argv[1:])
    assert args.command == "run" and args.config == Path("/etc/edge-agent/agent.toml")


def test_server_unit_runs_serve_from_its_environment_file() -> None:
    s = settings(UNITS / "fleet-server.service")
    assert s[("Service", "User")] == ["fleet-server"]
    assert s[("Service", "StateDirectory")] == ["fleet-server"]
    assert s[("Service", "EnvironmentFile")] == ["/etc/fleet-server/fleet-server.env"]
    env = env_file(UNITS / "fleet-server.env")
    line = s[("Service", "ExecStart")][0]
    # systemd's expansion: ${X} is one argument, a bare $X word splits into several.
    argv: list[str] = []
    for word in line.split():
        if word.startswith("${"):
            argv.append(env[word[2:-1]])
        elif word.startswith("$"):
            argv.extend(env[word[1:]].split())
        else:
            argv.append(word)
    assert argv[0] == "/opt/edgefleet/bin/fleet-server"
    args = server_parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert args.db == env["FLEET_DB"] and args.http == env["FLEET_HTTP"]
    assert args.repo == Path(env["FLEET_REPO"]) and args.keys == Path(env["FLEET_KEYS"])
    assert args.tls_key == Path("/etc/fleet-server/tls/fleet-server.key")
