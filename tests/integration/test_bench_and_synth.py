"""`edge-agent bench` reports every key; `edge-agent synth` is deterministic."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from edge_agent.cli import main
from tests.integration.reference import BUNDLES

BENCH_KEYS = {
    "raw_fps",
    "pipeline_fps",
    "pipeline_ratio",
    "jpeg_naive_fps",
    "jpeg_fps",
    "jpeg_ratio",
    "overhead_ms",
    "rss_mb",
    "cold_start_s",
    "runtime",
    "provider",
}


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_bench_json_has_every_key_with_measured_values(
    capsys: pytest.CaptureFixture[str], bundle: Path
) -> None:
    args = ["bench", "--json", "--model", str(bundle), "--frames", "100", "--jpegs", "30"]
    assert main([*args, "--rounds", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= BENCH_KEYS
    for key in BENCH_KEYS - {"runtime", "provider", "overhead_ms"}:
        assert result[key] > 0, key
    assert result["pipeline_ratio"] == pytest.approx(
        result["pipeline_fps"] / result["raw_fps"], rel=0.01
    )
    assert result["jpeg_ratio"] == pytest.approx(
        result["jpeg_fps"] / result["jpeg_naive_fps"], rel=0.01
    )
    assert 20 < result["rss_mb"] < 1000
    assert result["runtime"] in ("onnxruntime", "litert")


def _synth(out: Path, *extra: str) -> list[list[str]]:
    assert main(["synth", "--out", str(out), "--count", "6", "--seed", "5", *extra]) == 0
    with (out / "labels.csv").open() as f:
        return list(csv.reader(f))


def test_synth_writes_images_and_labels_deterministically(tmp_path: Path) -> None:
    rows = _synth(tmp_path / "a", "--size", "200x150", "--defect-rate", "0.5")
    again = _synth(tmp_path / "b", "--size", "200x150", "--defect-rate", "0.5")
    assert rows[0] == ["file", "label"]
    assert len(rows) == 7 and {r[1] for r in rows[1:]} <= {"ok", "defect"}
    assert rows == again
    for name, _ in rows[1:]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize(
    "bad",
    [["--size", "200"], ["--defect-rate", "1.5"], ["--brightness", "0"], ["--variant", "zz"]],
)
def test_synth_bad_arguments_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: list[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        code = main(["synth", "--out", str(tmp_path), "--count", "1", *bad])
        raise SystemExit(code)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
