"""Which profiles a release is for, and which assignments are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import ConfigError, FirmwareProfile
from fleet_server.compatibility import (
    CompatibilityError,
    check_assignment,
    find_profiles,
    release_profiles,
)

PROFILES_DIR = Path(__file__).resolve().parents[2] / "firmware_profiles"


@pytest.fixture(scope="module")
def known() -> dict[str, FirmwareProfile]:
    return find_profiles([PROFILES_DIR])


def test_finds_the_shipped_profiles(known: dict[str, FirmwareProfile]) -> None:
    assert set(known) == {"jetson-nano", "jetson-orin-nano", "rpi4", "rpi5", "x86-generic"}


def test_first_directory_wins_and_missing_dirs_are_skipped(tmp_path: Path) -> None:
    override = tmp_path / "override"
    override.mkdir()
    text = (PROFILES_DIR / "rpi4.toml").read_text()
    (override / "rpi4.toml").write_text(
        text.replace('runtimes = ["tflite", "onnx"]', 'runtimes = ["tflite"]')
    )
    found = find_profiles([tmp_path / "missing", override, PROFILES_DIR])
    assert found["rpi4"].runtimes == ["tflite"]
    assert found["rpi5"].runtimes == ["tflite", "onnx"]


def test_a_bad_profile_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.toml").write_text('name = "broken"\n')
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        find_profiles([tmp_path])


@pytest.mark.parametrize(
    ("runtime", "requested", "expected"),
    [
        ("onnx", None, ["jetson-nano", "jetson-orin-nano", "rpi4", "rpi5", "x86-generic"]),
        ("tflite", None, ["rpi4", "rpi5", "x86-generic"]),
        ("onnx", ["rpi5", "rpi4", "rpi5"], ["rpi4", "rpi5"]),
    ],
    ids=["onnx-default", "tflite-default", "narrowed-and-sorted"],
)
def test_release_profiles(
    known: dict[str, FirmwareProfile],
    runtime: str,
    requested: list[str] | None,
    expected: list[str],
) -> None:
    assert release_profiles(runtime, known, requested) == expected


@pytest.mark.parametrize(
    ("runtime", "requested", "message"),
    [
        ("tflite", ["jetson-nano"], "not 'tflite'"),
        ("onnx", ["rpi9"], "unknown firmware profile 'rpi9'"),
        ("onnx", [], "empty"),
        ("openvino", None, "no known firmware profile supports runtime 'openvino'"),
    ],
    ids=["lacks-runtime", "unknown", "empty", "no-profile-has-runtime"],
)
def test_release_profiles_refused(
    known: dict[str, FirmwareProfile], runtime: str, requested: list[str] | None, message: str
) -> None:
    with pytest.raises(CompatibilityError, match=message):
        release_profiles(runtime, known, requested)


def _custom(runtime: str, profiles: list[str]) -> dict[str, object]:
    return {"release_counter": 1, "runtime": runtime, "profiles": profiles}


def test_assignment_to_a_listed_profile_is_allowed(known: dict[str, FirmwareProfile]) -> None:
    check_assignment("m@1", _custom("tflite", ["rpi4", "rpi5"]), known["rpi5"])


@pytest.mark.parametrize(
    ("custom", "profile", "message"),
    [
        (_custom("tflite", ["rpi4", "rpi5"]), "jetson-nano", "not for firmware profile"),
        (_custom("tflite", ["jetson-nano"]), "jetson-nano", "needs runtime 'tflite'"),
        (_custom("onnx", []), "rpi4", "released for: none"),
        ({"release_counter": 1}, "rpi4", "no runtime or profile fields"),
        (None, "rpi4", "no runtime or profile fields"),
    ],
    ids=["profile-not-listed", "profile-lacks-runtime", "no-profiles", "no-fields", "no-custom"],
)
def test_assignment_refused(
    known: dict[str, FirmwareProfile], custom: object, profile: str, message: str
) -> None:
    with pytest.raises(CompatibilityError, match=message):
        check_assignment("m@1", custom, known[profile])
