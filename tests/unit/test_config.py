"""Agent config and firmware profiles: validation names the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from edge_agent.config import (
    AgentConfig,
    ConfigError,
    FirmwareProfile,
    load_config,
    load_profile,
)
from edge_agent.service import build_plan

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted((ROOT / "firmware_profiles").glob("*.toml"))

GOOD = """
[device]
id = "cam-1"
profile = "rpi4"

[source]
url = "folder:inbox"

[model]
bundle = "models/reference-onnx"

[storage]
state_dir = "state"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_example_config_loads() -> None:
    cfg = load_config(ROOT / "scripts" / "agent.example.toml")
    assert cfg.source.scheme == "synthetic"
    assert cfg.model.bundle == (ROOT / "models" / "reference-onnx").resolve()


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD))
    base = tmp_path.resolve()
    assert cfg.model.bundle == base / "models" / "reference-onnx"
    assert cfg.storage.state_dir == base / "state"
    assert cfg.source.target == str(base / "inbox")
    assert cfg.storage.results_db == base / "state" / "results.db"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("[source]\n", "[source]\nulr = 'x'\n"), "unknown key [source] ulr"),
        (("[device]\n", "[device]\ncolour = 'red'\n"), "unknown key [device] colour"),
        (('id = "cam-1"\n', ""), "missing key [device] id"),
        (("folder:inbox", "ftp:inbox"), "[source] url"),
        (("folder:inbox", "folder:"), "needs a target"),
        (("[storage]\n", "[storage]\nresults_max_rows = 5\n"), "[storage] results_max_rows"),
        (("[model]\n", "[thresholds]\nt_fail = 1.5\n[model]\n"), "[thresholds] t_fail"),
        (("[model]\n", "[log]\nformat = 'xml'\n[model]\n"), "[log] format"),
        (("[model]\n", "[runtime]\nthreads = 0\n[model]\n"), "[runtime] threads"),
        (("[model]\n", "[outputz]\n[model]\n"), "unknown key outputz"),
        (("[source]\n", "[source]\nsize = '640'\n"), "[source] size"),
        (('id = "cam-1"', 'id = "cam 1!"'), "[device] id"),
        (("[device]", "[device"), "not valid TOML"),
    ],
)
def test_bad_config_names_file_and_key(
    tmp_path: Path, edit: tuple[str, str], expected: str
) -> None:
    path = _write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value)
    assert expected in str(exc.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_shipped_profile_is_valid(path: Path) -> None:
    profile = load_profile(path.stem)
    assert profile.name == path.stem
    assert set(profile.runtimes) <= {"onnx", "tflite"}
    assert profile.providers[-1] == "CPUExecutionProvider"


def test_required_profiles_exist() -> None:
    names = {p.stem for p in PROFILES}
    assert {"rpi4", "rpi5", "jetson-orin-nano", "jetson-nano", "x86-generic"} <= names


def test_unknown_profile_lists_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found in") as exc:
        load_profile("no-such-board", [tmp_path])
    assert str(tmp_path) in str(exc.value)


def test_bad_profile_names_the_key(tmp_path: Path) -> None:
    text = "turbo = true\n" + (ROOT / "firmware_profiles" / "rpi4.toml").read_text()
    path = tmp_path / "board.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="unknown key turbo") as exc:
        load_profile(str(path))
    assert str(path) in str(exc.value)


def test_profile_values_are_defaults_that_config_overrides(tmp_path: Path) -> None:
    profile = load_profile("rpi4")
    cfg = load_config(_write(tmp_path, GOOD))
    plan = build_plan(cfg, profile)
    assert plan.runtime_options.threads == profile.threads
    assert plan.camera == (1280, 960, 15.0, "MJPG")
    assert sum(plan.evidence_quota.values()) <= profile.evidence.quota_mb * 1024 * 1024
    text = GOOD + "[runtime]\nthreads = 1\n"
    text = text.replace("[source]\n", "[source]\nwidth = 640\nfps = 5\n")
    plan = build_plan(load_config(_write(tmp_path, text)), profile)
    assert plan.runtime_options.threads == 1
    assert plan.camera == (640, 960, 5.0, "MJPG")


def _keys(model: type[BaseModel]) -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _keys(annotation)
    return keys


def _words(doc: str) -> set[str]:
    found = set()
    for token in ("`", "[", "] "):
        start = 0
        while (i := doc.find(token, start)) >= 0:
            end = doc.find("`" if token != "[" else "]", i + 1)
            if end < 0:
                break
            found.add(doc[i : end + 1])
            start = i + 1
    return found


def test_configuration_doc_mentions_every_key() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    keys = _keys(AgentConfig) | _keys(FirmwareProfile)
    # A key is documented as `key`, as a section heading [key], or as `[section] key`.
    missing = sorted(k for k in keys if not {f"`{k}`", f"[{k}]", f"] {k}`"} & _words(doc))
    assert not missing, f"docs/configuration.md lacks {missing}"
