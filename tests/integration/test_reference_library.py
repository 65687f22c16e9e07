"""Reference profiles for the drift monitor, from a real signed repository and from
bundle directories (fleet_server.workers.references)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import pytest

from edge_agent.bundle import load_bundle
from edge_agent.core.stats import edges_of
from edge_agent.protocol.telemetry import edges_id
from edge_agent.update.unpack import pack_bundle
from fleet_server.repository import FleetRepository, init_keys, release_path
from fleet_server.workers.references import ReferenceLibrary

ROOT = Path(__file__).resolve().parents[2]
ONNX_BUNDLE = ROOT / "models" / "reference-onnx"
MODEL = "reference-onnx@1.0.0"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fleet")
    init_keys(base / "keys")
    fleet = FleetRepository(base / "repo" / "metadata", base / "keys", base / "repo" / "targets")
    now = datetime.now(timezone.utc)
    fleet.create(now=now)
    pack_bundle(ONNX_BUNDLE, base / "bundle.tar")
    fleet.add_release(
        "reference-onnx", "1.0.0", base / "bundle.tar", runtime="onnx", profiles=["rpi5"], now=now
    )
    return base / "repo"


def test_a_released_bundle_gives_its_reference_and_decision(repo: Path) -> None:
    library = ReferenceLibrary(repo=repo)
    reference = library.get(MODEL)
    manifest = load_bundle(ONNX_BUNDLE).manifest
    assert reference is not None and manifest.reference is not None
    assert reference.profile == manifest.reference and reference.decision == manifest.decision
    assert reference.ref_id == edges_id(edges_of(manifest.reference))
    assert reference.source == f"release {release_path('reference-onnx', '1.0.0')}"
    assert library.get(MODEL) is reference  # cached


def test_a_tampered_release_is_not_used(
    repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tar = repo / "targets" / release_path("reference-onnx", "1.0.0")
    original = tar.read_bytes()
    try:
        tar.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with caplog.at_level(logging.WARNING):
            assert ReferenceLibrary(repo=repo).get(MODEL) is None
        assert "does not match release.json" in caplog.text and str(tar) in caplog.text
    finally:
        tar.write_bytes(original)


def test_unknown_models_are_asked_again_after_the_retry_period(repo: Path, tmp_path: Path) -> None:
    clock = [0.0]
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    library = ReferenceLibrary(
        repo=repo, bundle_dirs=[bundles], retry_s=60.0, clock=lambda: clock[0]
    )
    assert library.get("reference-tflite@1.0.0") is None
    # The bundle appears in a bundle directory; it is found once the retry period is over.
    (bundles / "tflite").symlink_to(ROOT / "models" / "reference-tflite")
    assert library.get("reference-tflite@1.0.0") is None
    clock[0] = 61.0
    found = library.get("reference-tflite@1.0.0")
    assert found is not None and found.source == str(bundles / "tflite")
    assert library.get("not-a-model-id") is None
