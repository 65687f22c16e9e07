"""`edge-agent infer` on the real reference bundles, good and bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.cli import main
from tests.integration.reference import BUNDLES, ONNX_BUNDLE

REASONS = {
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "corrupt-header.jpg": "",
    "text.jpg": "not an image",
    "bomb.png": "pixels",
    "directory": "directory",
    "missing": "no such file",
}


def _run_json(
    capsys: pytest.CaptureFixture[str], bundle: Path, paths: list[Path]
) -> list[dict[str, object]]:
    code = main(["infer", "--json", "--model", str(bundle), *map(str, paths)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(paths)
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_bad_images_get_error_verdicts_and_the_rest_is_inspected(
    capsys: pytest.CaptureFixture[str],
    bundle: Path,
    bad_inputs: dict[str, Path],
    odd_inputs: dict[str, Path],
) -> None:
    # Interleave bad and good inputs: every good one after a bad one is still inspected.
    names = list(bad_inputs)
    goods = list(odd_inputs.values())
    paths: list[Path] = []
    for i, name in enumerate(names):
        paths += [bad_inputs[name], goods[i % len(goods)]]
    records = _run_json(capsys, bundle, paths)
    for i, name in enumerate(names):
        bad, good = records[2 * i], records[2 * i + 1]
        assert bad["verdict"] == "error", (name, bad)
        assert bad["p_defect"] is None
        reason = str(bad["error"])
        assert reason and REASONS[name] in reason.lower(), (name, reason)
        assert good["verdict"] in ("pass", "fail", "uncertain"), good
        assert isinstance(good["p_defect"], float) and 0.0 <= good["p_defect"] <= 1.0
        assert set(good) == {"path", "label", "p_defect", "verdict", "latency_ms"}


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_odd_but_valid_images_are_inspected(
    capsys: pytest.CaptureFixture[str], bundle: Path, odd_inputs: dict[str, Path]
) -> None:
    records = _run_json(capsys, bundle, list(odd_inputs.values()))
    for name, record in zip(odd_inputs, records, strict=True):
        assert record["verdict"] in ("pass", "fail", "uncertain"), (name, record)
        assert record["label"] in ("ok", "defect")


def _copy_bundle(tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(ONNX_BUNDLE, copy)
    return copy


def test_tampered_model_file_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sample_jpeg: bytes
) -> None:
    bundle = _copy_bundle(tmp_path)
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    image = tmp_path / "x.jpg"
    image.write_bytes(sample_jpeg)
    assert main(["infer", "--model", str(bundle), str(image)]) == 2
    err = capsys.readouterr().err
    assert "model.onnx" in err and "sha256" in err


def test_manifest_typo_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _copy_bundle(tmp_path)
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["decision"]["t_fial"] = manifest["decision"].pop("t_fail")
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    assert main(["infer", "--model", str(bundle), "whatever.jpg"]) == 2
    err = capsys.readouterr().err
    assert "decision.t_fial" in err and "bundle.json" in err


def test_missing_bundle_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["infer", "--model", str(tmp_path / "nope"), "x.jpg"]) == 2
    assert "not a bundle directory" in capsys.readouterr().err


def test_console_script_runs_and_bad_usage_exits_2(tmp_path: Path, sample_jpeg: bytes) -> None:
    image = tmp_path / "x.jpg"
    image.write_bytes(sample_jpeg)
    cmd = [sys.executable, "-m", "edge_agent.cli"]
    ok = subprocess.run(
        [*cmd, "infer", "--json", "--model", str(ONNX_BUNDLE), str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["verdict"] in ("pass", "fail", "uncertain")
    usage = subprocess.run([*cmd, "infer"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2
    assert "IMAGE" in usage.stderr
