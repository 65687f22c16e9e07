"""The health gate on real models: each refusal reason from a real broken candidate.

Candidates are real bundles sealed into tmp_path: a garbage model file with matching
hashes, wrong golden expectations, a tiny real ONNX model whose outputs are NaN (its
protobuf bytes written here, so no ``onnx`` package is needed), changed thresholds, and
the reference models under limits they cannot meet. The active model is the ONNX
reference run by the real pipeline on synthetic JPEG frames.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from edge_agent.bundle import seal_bundle
from edge_agent.core.frame import Frame
from edge_agent.core.verdict import Verdict, error_verdict
from edge_agent.inspect import Inspector
from edge_agent.pipeline import Pipeline
from edge_agent.protocol.manifest import MANIFEST_NAME
from edge_agent.runtimes import RuntimeOptions
from edge_agent.sources.synthetic import SyntheticLine
from edge_agent.update.errors import GateError, Reason
from edge_agent.update.gate import (
    GateLimits,
    GateReport,
    ShadowRun,
    check_golden,
    open_candidate,
    refused_report,
)
from tests.integration.reference import ONNX_BUNDLE, TFLITE_BUNDLE, UNSEEN_SEED

LIVE_FRAMES = 240
# Limits a healthy reference model meets with room to spare on any test machine; the
# queue holds every live frame, as the tests offer them faster than a camera would.
LOOSE = GateLimits(max_latency_ms=250.0, max_memory_mb=8192.0, queue_size=LIVE_FRAMES)

Live = list[tuple[Frame, Verdict]]


@pytest.fixture(scope="module")
def live() -> Live:
    """Frames and the active (ONNX reference) model's verdicts, as the agent's loop has them."""
    active = Inspector.open(ONNX_BUNDLE)
    line = SyntheticLine(seed=UNSEEN_SEED, size=(640, 480), count=LIVE_FRAMES, encode_jpeg=True)
    out = [(r.frame, r.verdict) for r in Pipeline(active, decode_workers=2).run(line)]
    active.close()
    assert len(out) == LIVE_FRAMES and all(v.error is None for _, v in out)
    return out


# -- building real candidate bundles --------------------------------------------------


def _copy_bundle(
    src: Path,
    dst: Path,
    edit: Callable[[dict[str, object]], None] | None = None,
    model: bytes | None = None,
) -> Path:
    """Copy bundle ``src`` to ``dst``, optionally edit its manifest or replace its model
    file, and seal it again: the hashes match, so only the gate can refuse it."""
    draft = json.loads((src / MANIFEST_NAME).read_text())
    dst.mkdir()
    for name in draft.pop("files"):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dst / name)
    if model is not None:
        (dst / str(draft["model"])).write_bytes(model)
    if edit is not None:
        edit(draft)
    seal_bundle(dst, draft)
    return dst


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(number: int, value: int | str | bytes) -> bytes:
    """One protobuf field: a varint, or length-delimited bytes (strings, messages)."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _float_tensor_type(name: str, dims: tuple[int, ...]) -> bytes:
    shape = b"".join(_pb(1, _pb(1, d)) for d in dims)  # TensorShapeProto.dim.dim_value
    tensor = _pb(1, 1) + _pb(2, shape)  # elem_type FLOAT, shape
    return _pb(1, name) + _pb(2, _pb(1, tensor))  # ValueInfoProto name, type.tensor_type


def _node(op: str, inputs: list[str], output: str) -> bytes:
    return b"".join(_pb(1, i) for i in inputs) + _pb(2, output) + _pb(3, output) + _pb(4, op)


def nan_onnx_model() -> bytes:
    """A real ONNX model for the reference input (1x3x120x160 float) whose two outputs are
    NaN for every input: pool -> flatten -> matmul by zeros -> 0 / 0."""
    weights = np.zeros((3, 2), np.float32)
    init = b"".join(_pb(1, d) for d in weights.shape)
    init += _pb(2, 1) + _pb(8, "w") + _pb(9, weights.tobytes())  # FLOAT, name, raw_data
    graph = b"".join(
        _pb(1, n)
        for n in (
            _node("GlobalAveragePool", ["input"], "pooled"),
            _node("Flatten", ["pooled"], "flat"),
            _node("MatMul", ["flat", "w"], "zeros"),
            _node("Div", ["zeros", "zeros"], "output"),
        )
    )
    graph += _pb(2, "nan") + _pb(5, init)
    graph += _pb(11, _float_tensor_type("input", (1, 3, 120, 160)))
    graph += _pb(12, _float_tensor_type("output", (1, 2)))
    opset = _pb(1, "") + _pb(2, 13)
    return _pb(1, 7) + _pb(2, "edgefleet-tests") + _pb(7, graph) + _pb(8, opset)


def _altered(bundle: Path) -> Path:
    with (bundle / "golden" / "ok-1.png").open("ab") as f:
        f.write(b"\0")  # the hash in bundle.json no longer matches
    return bundle


def _wrong_golden(draft: dict[str, object]) -> None:
    golden = draft["golden"]
    assert isinstance(golden, list)
    golden[0]["p_defect"] = 0.9  # an "ok" sample the model scores near 0


def _thresholds_moved(draft: dict[str, object]) -> None:
    # Every p >= 0 is now at least "uncertain": the active model's passes all disagree.
    draft["decision"] = {"t_fail": 0.999, "t_uncertain": 0.0}


# -- the gate as the agent runs it ----------------------------------------------------


def run_gate(bundle: Path, limits: GateLimits, live: Live, golden: bool = True) -> GateReport:
    """open -> golden -> shadow run on the live frames -> report (refusals as reports)."""
    try:
        candidate = open_candidate(bundle, RuntimeOptions())
    except GateError as e:
        return refused_report(bundle.name, e)
    try:
        golden_error = check_golden(candidate) if golden else math.nan
    except GateError as e:
        candidate.close()
        return refused_report(candidate.manifest.id, e)
    shadow = ShadowRun(candidate, limits, golden_max_error=golden_error)
    for frame, verdict in live:
        shadow.offer(frame, verdict)
    report = shadow.wait(limits.timeout_s + 30.0)
    assert report is not None, "the shadow run must end by its own timeout"
    assert shadow.close() is report
    candidate.close()
    return report


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]
    reason: Reason
    limits: GateLimits = LOOSE
    golden: bool = True


CASES = [
    Case(
        "garbage ONNX model file",
        lambda d: _copy_bundle(ONNX_BUNDLE, d, model=b"not a model " * 64),
        Reason.GATE_LOAD,
    ),
    Case(
        "garbage LiteRT model file",
        lambda d: _copy_bundle(TFLITE_BUNDLE, d, model=b"not a model " * 64),
        Reason.GATE_LOAD,
    ),
    Case(
        "bundle file altered after sealing",
        lambda d: _altered(_copy_bundle(TFLITE_BUNDLE, d)),
        Reason.GATE_LOAD,
    ),
    Case(
        "wrong golden expectation",
        lambda d: _copy_bundle(TFLITE_BUNDLE, d, edit=_wrong_golden),
        Reason.GATE_GOLDEN,
    ),
    Case(
        "NaN outputs on golden samples",
        lambda d: _copy_bundle(ONNX_BUNDLE, d, model=nan_onnx_model()),
        Reason.GATE_NAN,
    ),
    Case(
        "NaN outputs on live frames",
        lambda d: _copy_bundle(ONNX_BUNDLE, d, model=nan_onnx_model()),
        Reason.GATE_NAN,
        golden=False,
    ),
    Case(
        "p99 latency over the limit",
        lambda d: _copy_bundle(TFLITE_BUNDLE, d),
        Reason.GATE_LATENCY,
        replace(LOOSE, max_latency_ms=0.001),
    ),
    Case(
        "resident memory over the limit",
        lambda d: _copy_bundle(TFLITE_BUNDLE, d),
        Reason.GATE_MEMORY,
        replace(LOOSE, max_memory_mb=1.0),
    ),
    Case(
        "outcomes disagree with the active model",
        lambda d: _copy_bundle(ONNX_BUNDLE, d, edit=_thresholds_moved),
        Reason.GATE_AGREEMENT,
        replace(LOOSE, min_agreement=0.99),
    ),
    Case(
        "too few live frames in time",
        lambda d: _copy_bundle(TFLITE_BUNDLE, d),
        Reason.GATE_TIMEOUT,
        replace(LOOSE, shadow_frames=LIVE_FRAMES + 1, timeout_s=1.0),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_gate_refuses(case: Case, tmp_path: Path, live: Live) -> None:
    report = run_gate(case.build(tmp_path / "candidate"), case.limits, live, case.golden)
    print(f"\n{case.name}: {report}")
    assert not report.passed
    assert report.reason is case.reason, report.message
    assert report.message
    if case.reason is Reason.GATE_NAN and not case.golden:
        assert report.nan_frames == 1


def test_tflite_candidate_passes_beside_the_onnx_model(live: Live) -> None:
    limits = LOOSE
    report = run_gate(TFLITE_BUNDLE, limits, live)
    print(f"\npassing gate: {report}")
    assert report.passed and report.reason is None, report.message
    assert report.candidate == "reference-tflite@1.0.0"
    assert report.frames == limits.shadow_frames and report.skipped == 0
    assert report.agreement >= limits.min_agreement
    assert 0.0 < report.p99_latency_ms <= limits.max_latency_ms
    assert 0.0 < report.rss_mb <= limits.max_memory_mb
    assert 0.0 <= report.golden_max_error <= 0.05
    assert report.nan_frames == 0


def test_active_error_verdicts_are_not_compared(live: Live) -> None:
    candidate = open_candidate(TFLITE_BUNDLE, RuntimeOptions())
    shadow = ShadowRun(candidate, replace(LOOSE, shadow_frames=20))
    for frame, verdict in live[:20]:
        shadow.offer(frame, error_verdict(frame.frame_id, "decode failed"))
        shadow.offer(frame, verdict)
    report = shadow.wait(30.0)
    candidate.close()
    assert report is not None and report.passed, report
    assert report.frames == 20 and report.active_errors == 20


def test_candidate_that_raises_fails_the_gate_not_the_caller(live: Live) -> None:
    candidate = open_candidate(TFLITE_BUNDLE, RuntimeOptions())
    candidate.close()  # a loaded model whose runtime then fails on every call
    shadow = ShadowRun(candidate, LOOSE)
    for frame, verdict in live:
        shadow.offer(frame, verdict)  # must not raise
    report = shadow.wait(30.0)
    assert report is not None and not report.passed
    assert report.reason is Reason.GATE_LOAD and "failed on a live frame" in report.message


def test_close_ends_an_unfinished_run(live: Live) -> None:
    candidate = open_candidate(TFLITE_BUNDLE, RuntimeOptions())
    shadow = ShadowRun(candidate, LOOSE)
    for frame, verdict in live[:10]:
        shadow.offer(frame, verdict)
    assert shadow.wait(0.05) is None  # 10 of 200 frames: the run cannot be over
    with pytest.raises(RuntimeError):
        shadow.result()
    report = shadow.close()
    candidate.close()
    assert report.reason is Reason.GATE_TIMEOUT and "before close" in report.message
    assert report.frames <= 10


def _jpeg_stream(live: Live, n: int) -> Iterator[Frame]:
    for i in range(n):
        frame = live[i % len(live)][0]
        yield Frame(i, 0.0, "test", data=frame.data)


def test_offer_never_blocks_a_line_running_flat_out(live: Live) -> None:
    """The line at full speed with the gate attached: offers return at once, the shadow
    thread skips what it cannot keep up with, and the line's throughput is measured
    with and without the gate."""
    active = Inspector.open(ONNX_BUNDLE)
    candidate = open_candidate(TFLITE_BUNDLE, RuntimeOptions())
    n = 600

    def line(shadow: ShadowRun | None) -> tuple[float, float]:
        slowest = 0.0
        started = time.perf_counter()
        for r in Pipeline(active, decode_workers=2).run(_jpeg_stream(live, n)):
            if shadow is not None:
                t = time.perf_counter()
                shadow.offer(r.frame, r.verdict)
                slowest = max(slowest, time.perf_counter() - t)
        return n / (time.perf_counter() - started), slowest

    line(None)  # warm-up
    fps_alone, _ = line(None)
    shadow = ShadowRun(candidate, GateLimits(max_latency_ms=250.0, max_memory_mb=8192.0))
    fps_gated, slowest = line(shadow)
    report = shadow.close()
    candidate.close()
    active.close()
    print(
        f"\nline {fps_alone:.0f} fps alone, {fps_gated:.0f} fps with the gate "
        f"(ratio {fps_gated / fps_alone:.2f}); slowest offer {slowest * 1000:.2f} ms; "
        f"shadow compared {report.frames}, skipped {report.skipped}"
    )
    assert slowest < 0.05  # a GIL hand-over at most, never a wait for the shadow thread
    assert report.skipped > 0 and report.frames + report.skipped <= n
    assert fps_gated >= 0.5 * fps_alone


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="shadow_frames"):
        replace(LOOSE, shadow_frames=0)
    with pytest.raises(ValueError, match="min_agreement"):
        replace(LOOSE, min_agreement=1.5)
    with pytest.raises(ValueError, match="max_latency_ms"):
        replace(LOOSE, max_latency_ms=0.0)


def test_nan_model_bytes_are_a_valid_onnx_model(tmp_path: Path) -> None:
    """The hand-written protobuf loads in onnxruntime and gives NaN, not a load error."""
    import onnxruntime as ort

    path = tmp_path / "nan.onnx"
    path.write_bytes(nan_onnx_model())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.ones((1, 3, 120, 160), np.float32)})[0]
    assert out.shape == (1, 2) and np.isnan(out).all()


def test_unknown_resident_memory_fails_the_memory_check(live: Live) -> None:
    candidate = open_candidate(TFLITE_BUNDLE, RuntimeOptions())
    shadow = ShadowRun(candidate, replace(LOOSE, shadow_frames=20), read_rss=lambda: math.nan)
    for frame, verdict in live[:20]:
        shadow.offer(frame, verdict)
    report = shadow.wait(30.0)
    candidate.close()
    assert report is not None and report.reason is Reason.GATE_MEMORY, report
    assert "unknown" in report.message
