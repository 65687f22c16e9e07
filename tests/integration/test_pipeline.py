"""The overlapped pipeline on the real ONNX bundle."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import cv2
import pytest

from edge_agent.core.frame import Frame
from edge_agent.core.synthetic import LineConditions, render_item
from edge_agent.inspect import Inspector
from edge_agent.pipeline import Pipeline
from tests.integration.reference import ONNX_BUNDLE, UNSEEN_SEED


@pytest.fixture(scope="module")
def inspector() -> Inspector:
    return Inspector.open(ONNX_BUNDLE)


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    out = []
    for i in range(16):
        image = render_item(UNSEEN_SEED, i, (640, 480), LineConditions()).image
        out.append(cv2.imencode(".jpg", image)[1].tobytes())
    return out


def _frames(jpegs: list[bytes], n: int, bad_every: int = 0) -> Iterator[Frame]:
    for i in range(n):
        data = b"garbage" if bad_every and i % bad_every == 0 else jpegs[i % len(jpegs)]
        yield Frame(i, float(i), "test", data=data)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_come_out_in_order_and_complete(
    inspector: Inspector, jpegs: list[bytes], workers: int
) -> None:
    pipeline = Pipeline(inspector, decode_workers=workers, queue_size=4)
    ids = [r.verdict.frame_id for r in pipeline.run(_frames(jpegs, 120))]
    assert ids == list(range(120))
    assert pipeline.counters.inspected == 120 and pipeline.counters.dropped == 0


def test_bad_frames_become_error_verdicts_and_the_line_keeps_running(
    inspector: Inspector, jpegs: list[bytes]
) -> None:
    results = list(Pipeline(inspector).run(_frames(jpegs, 50, bad_every=5)))
    assert len(results) == 50
    for r in results:
        if r.verdict.frame_id % 5 == 0:
            assert r.verdict.outcome.value == "error" and r.verdict.error
            assert r.fitted is None
        else:
            assert r.verdict.outcome.value in ("pass", "fail", "uncertain")
            assert r.fitted is not None and r.fitted.shape[:2] == (120, 160)


def test_same_verdicts_as_the_sequential_path(inspector: Inspector, jpegs: list[bytes]) -> None:
    piped = [r.verdict for r in Pipeline(inspector, decode_workers=2).run(_frames(jpegs, 16))]
    for v, data in zip(piped, jpegs, strict=True):
        seq = inspector.inspect_bytes(data)
        assert v.outcome is seq.outcome and v.p_defect == pytest.approx(seq.p_defect, abs=1e-6)


def test_live_source_drops_oldest_and_counts_it(inspector: Inspector, jpegs: list[bytes]) -> None:
    pipeline = Pipeline(inspector, queue_size=2, drop_oldest=True)
    release = threading.Event()
    results = []
    for r in pipeline.run(_frames(jpegs, 300)):
        results.append(r.verdict.frame_id)
        if len(results) == 1:
            release.wait(0.5)  # a slow consumer: the camera does not wait for it
    counters = pipeline.counters
    assert counters.dropped > 0
    assert counters.inspected + counters.dropped == counters.frames_in == 300
    assert results == sorted(results) and len(results) == counters.inspected


def test_stop_drains_what_was_read(inspector: Inspector, jpegs: list[bytes]) -> None:
    pipeline = Pipeline(inspector, queue_size=4)

    def endless() -> Iterator[Frame]:
        i = 0
        while True:
            yield Frame(i, 0.0, "test", data=jpegs[i % len(jpegs)])
            i += 1

    seen = 0
    for _ in pipeline.run(endless()):
        seen += 1
        if seen == 20:
            pipeline.stop()
    assert seen == pipeline.counters.frames_in >= 20


def test_source_crash_reaches_the_caller(inspector: Inspector, jpegs: list[bytes]) -> None:
    def broken() -> Iterator[Frame]:
        yield from _frames(jpegs, 3)
        raise OSError("camera unplugged")

    with pytest.raises(OSError, match="camera unplugged"):
        list(Pipeline(inspector).run(broken()))
