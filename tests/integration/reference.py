"""Paths of the committed reference bundles, shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ONNX_BUNDLE = ROOT / "models" / "reference-onnx"
TFLITE_BUNDLE = ROOT / "models" / "reference-tflite"
BUNDLES = [ONNX_BUNDLE, TFLITE_BUNDLE]
# Seeds the reference model never saw in training (training uses seeds from 1000 up).
UNSEEN_SEED = 424242
