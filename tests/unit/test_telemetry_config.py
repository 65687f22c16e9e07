"""``[telemetry]``, ``[device] line`` and how ``[fleet]`` splits updates from telemetry."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import ConfigError, load_config

BASE = """
[device]
id = "cam-1"
{device}

[source]
url = "synthetic:"

[model]
bundle = "bundle"
{rest}
"""


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, ""))
    tel = cfg.telemetry
    assert (tel.enabled, tel.window_frames, tel.window_s) == (True, 500, 60.0)
    assert tel.spool_max_bytes == 16 * 1024 * 1024 and tel.spool_max_windows == 10_000
    assert cfg.device.line is None
    assert not cfg.fleet.enabled and not cfg.fleet.updates


def test_a_broker_without_a_trust_root_gives_telemetry_without_updates(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, '[fleet]\nbroker = "127.0.0.1:1883"'))
    assert cfg.fleet.enabled and not cfg.fleet.updates and cfg.telemetry.enabled


def test_a_broker_with_a_trust_root_gives_both(tmp_path: Path) -> None:
    rest = '[fleet]\nbroker = "127.0.0.1:1883"\nroot_metadata = "root.json"'
    cfg = load_config(_write(tmp_path, rest))
    assert cfg.fleet.updates and cfg.fleet.root_metadata == tmp_path / "root.json"


@pytest.mark.parametrize(
    ("rest", "device", "named"),
    [
        ("[telemetry]\nwindow_frames = 49", "", "[telemetry] window_frames"),
        ("[telemetry]\nwindow_s = 0", "", "[telemetry] window_s"),
        ("[telemetry]\nspool_max_mb = -1", "", "[telemetry] spool_max_mb"),
        ("[telemetry]\nspool_max_windows = 0", "", "[telemetry] spool_max_windows"),
        ("[telemetry]\ndrift_hold_windows = 0", "", "[telemetry] drift_hold_windows"),
        ("[telemetry]\nwindow = 5", "", "unknown key [telemetry] window"),
        ("", f'line = "{"x" * 97}"', "[device] line"),
        ('[fleet]\nroot_metadata = "root.json"', "", "root_metadata needs broker"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, rest: str, device: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_config(_write(tmp_path, rest, device))


def _write(tmp_path: Path, rest: str, device: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(BASE.format(rest=rest, device=device))
    return path
