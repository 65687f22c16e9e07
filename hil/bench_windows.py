"""Realistic telemetry windows for the fleet benchmarks, encoded ahead of time.

``window_templates`` closes windows with the agent's own ``WindowAccumulator`` over
per-frame features drawn from the reference profile of the ONNX reference bundle, so
every window is full size (moments, histograms, P(defect) sums, latency) and in control
for the drift detectors; ``stream`` gives each device its own sequence of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from edge_agent.core.stats import WindowAccumulator, edges_of
from edge_agent.protocol import topics
from edge_agent.protocol.manifest import FEATURE_NAMES, BundleManifest
from edge_agent.protocol.telemetry import TelemetryWindow, encode_window

ROOT = Path(__file__).resolve().parents[1]
ONNX_BUNDLE = ROOT / "models" / "reference-onnx"
WINDOW_FRAMES = 500
TEMPLATES = 64
T0 = 1_800_000_000
WINDOW_S = 60


def window_templates(
    count: int, *, seed: int = 1, bundle: Path = ONNX_BUNDLE
) -> list[TelemetryWindow]:
    """``count`` distinct windows of ``WINDOW_FRAMES`` frames as the agent closes them.

    Per frame, each feature is drawn from the bundle's reference histogram (a bin by its
    count, uniform inside it) and the verdict follows the bundle's thresholds, so the
    windows are in control for the drift detectors. ``seq``, ``t0`` and ``t1`` are
    placeholders: ``stream`` sets them per device.
    """
    manifest = BundleManifest.model_validate_json((bundle / "bundle.json").read_bytes())
    profile, decision = manifest.reference, manifest.decision
    if profile is None:
        raise ValueError(f"{bundle}: the bundle has no reference profile")
    accumulator = WindowAccumulator(edges_of(profile), max_frames=WINDOW_FRAMES)
    rng = np.random.default_rng(seed)
    model = f"{manifest.name}@{manifest.version}"
    out = []
    for _ in range(count):
        rows = np.empty((WINDOW_FRAMES, len(FEATURE_NAMES)))
        for j, name in enumerate(FEATURE_NAMES):
            feature = profile.features[name]
            edges = np.asarray(feature.edges)
            counts = np.asarray(feature.counts, dtype=np.float64)
            bins = rng.choice(len(counts), size=WINDOW_FRAMES, p=counts / counts.sum())
            low = np.concatenate([[edges[0]], edges])
            high = np.concatenate([edges, [edges[-1]]])
            rows[:, j] = low[bins] + rng.random(WINDOW_FRAMES) * (high[bins] - low[bins])
        for i, row in enumerate(rows):
            p = float(row[-1])
            outcome = (
                "fail" if p >= decision.t_fail else "uncertain" if p >= decision.t_uncertain
                else "pass"
            )  # fmt: skip
            accumulator.add(outcome, row[:-1], p, 3.0 + i % 5, T0 + i * 0.1)
        window = accumulator.close(T0 + WINDOW_S, seq=1, model=model, edge="0.1.0")
        assert window is not None
        out.append(window)
    return out


def device_id(index: int) -> str:
    return f"bench-{index:05d}"


def stream(
    templates: Sequence[TelemetryWindow], devices: Sequence[int], per_device: int
) -> list[tuple[str, bytes]]:
    """Encoded (topic, payload) pairs: round by round, each device's next window."""
    out = []
    for seq in range(1, per_device + 1):
        for index in devices:
            template = templates[(index * 7 + seq) % len(templates)]
            t0 = T0 + (seq - 1) * WINDOW_S
            window = replace(template, seq=seq, t0=t0, t1=t0 + WINDOW_S)
            out.append((topics.telemetry(device_id(index)), encode_window(window)))
    return out
