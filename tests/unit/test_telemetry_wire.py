"""The telemetry window wire format and the privacy rules (edge_agent.protocol.telemetry)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from edge_agent.protocol.telemetry import (
    LATENCY_EDGES_MS,
    MAX_WINDOW_BYTES,
    MIN_FRAMES_PER_BIN,
    MIN_WINDOW_FRAMES,
    Moments,
    PrivacyError,
    TelemetryWindow,
    check_privacy,
    decode_window,
    edges_id,
    encode_window,
)

FRAMES = 400
P_BINS = 6  # p_defect histogram: 5 edges -> 6 counts


def _window(**changes: object) -> TelemetryWindow:
    p_hist = [0, 300, 40, 20, 40, 0]
    base = TelemetryWindow(
        seq=7,
        t0=1_800_000_000,
        t1=1_800_000_060,
        model="reference-onnx@1.0.0",
        edge="0.1.0",
        ref="0123456789abcdef",
        counts={"pass": 330, "fail": 60, "uncertain": 8, "error": 2, "dropped": 5},
        moments={
            "brightness": Moments(398, 26_000.123456789, 1_700_000.987654321),
            "p_defect": Moments(398, 31.5, 20.25),
        },
        hist={"brightness": [0] * 10 + [398] + [0] * 10, "p_defect": p_hist},
        p_sum=[None, 7.25, 10.0, 11.0, 35.5, None],
        latency=[0, 100, 200, 98] + [0] * (len(LATENCY_EDGES_MS) - 3),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_round_trip_is_exact_and_compact() -> None:
    window = _window()
    payload = encode_window(window)
    assert len(payload) <= MAX_WINDOW_BYTES
    back = decode_window(payload)
    assert back.moments == window.moments  # floats survive exactly (repr round trip)
    assert list(back.p_sum or []) == list(window.p_sum or [])
    assert dict(back.counts) == dict(window.counts)
    assert {k: list(v) for k, v in back.hist.items()} == {
        k: list(v) for k, v in window.hist.items()
    }
    assert back.frames == 400
    assert b" " not in payload  # compact separators


def test_frames_excludes_dropped() -> None:
    assert _window().frames == 330 + 60 + 8 + 2


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        pytest.param(
            {"counts": {"pass": 49, "fail": 0, "uncertain": 0, "error": 0, "dropped": 900}},
            "covers 49 frames",
            id="window-under-50-frames-dropped-do-not-count",
        ),
        pytest.param(
            {"moments": {"brightness": Moments(49, 1.0, 1.0)}},
            "over 49 frames",
            id="moments-over-too-few-frames",
        ),
        pytest.param(
            {"moments": {"brightness": Moments(401, 1.0, 1.0)}},
            "window has 400",
            id="moments-over-more-frames-than-the-window",
        ),
        pytest.param(
            {"hist": {"brightness": [0] * 41 + [409]}},
            "< 10 per bin",
            id="histogram-under-10-per-bin",
        ),
        pytest.param(
            {"hist": {"brightness": [200, 201]}},
            "2 bins",
            id="histogram-of-two-bins",
        ),
        pytest.param(
            {"hist": {"brightness": [401] + [0] * 20}},
            "window has 400",
            id="histogram-over-more-frames-than-the-window",
        ),
        pytest.param(
            {"latency": [10] * 39 + [0]},
            "latency histogram holds 390 frames in 40 bins",
            id="latency-under-10-per-bin",
        ),
        pytest.param(
            {"p_sum": [0.5, 7.25, 10.0, 11.0, 35.5, None]},
            "p_sum[0] sent for a bin of 0 frames",
            id="p-sum-of-an-empty-or-small-bin",
        ),
        pytest.param(
            {"p_sum": [None, 301.0, 10.0, 11.0, 35.5, None]},
            "outside 0..300",
            id="p-sum-above-the-bin-count",
        ),
        pytest.param(
            {"p_sum": [None, 1.0]},
            "same length",
            id="p-sum-length",
        ),
        pytest.param(
            {"hist": {"brightness": [0] * 10 + [398] + [0] * 10}},
            "p_sum needs a p_defect histogram",
            id="p-sum-without-p-histogram",
        ),
    ],
)
def test_privacy_rules_refuse_to_encode(changes: dict[str, object], rule: str) -> None:
    window = _window(**changes)
    with pytest.raises(PrivacyError, match=re.escape(rule)):
        check_privacy(window)
    with pytest.raises(PrivacyError, match=re.escape(rule)):
        encode_window(window)


def test_decode_applies_the_privacy_rules_too() -> None:
    document = json.loads(encode_window(_window()))
    document["counts"] = {"pass": 10, "fail": 0, "uncertain": 0, "error": 0, "dropped": 0}
    document.pop("moments")
    document.pop("hist")
    document.pop("p_sum")
    document.pop("latency")
    with pytest.raises(PrivacyError, match="covers 10 frames"):
        decode_window(json.dumps(document).encode())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(lambda d: d.update(min=[1.0]), "unknown keys in window: min", id="min"),
        pytest.param(lambda d: d.update(frames=[1, 2]), "unknown keys", id="per-frame-list"),
        pytest.param(lambda d: d.update(v=2), "unsupported window version", id="version"),
        pytest.param(lambda d: d["counts"].pop("dropped"), "counts must have", id="counts"),
        pytest.param(lambda d: d["counts"].update(pass_=1), "counts must have", id="count-key"),
        pytest.param(
            lambda d: d["moments"].update(brightness=[400, 1.0]), "sum_sq", id="moments-shape"
        ),
        pytest.param(lambda d: d.update(seq=-1), "seq must be", id="negative-seq"),
        pytest.param(lambda d: d.update(seq=True), "seq must be", id="bool-seq"),
        pytest.param(lambda d: d.update(model=""), "model must be", id="empty-model"),
        pytest.param(lambda d: d.update(latency=[1] * 67), "at most 66", id="long-list"),
        pytest.param(lambda d: d.update(p_sum="x"), "p_sum must be", id="p-sum-type"),
        pytest.param(lambda d: d["hist"].update(brightness=[1.5] * 40), "non-negative", id="h"),
    ],
)
def test_decode_rejects_malformed_windows(edit: object, message: str) -> None:
    document = json.loads(encode_window(_window()))
    assert callable(edit)
    edit(document)
    with pytest.raises(ValueError, match=message):
        decode_window(json.dumps(document).encode())


def test_decode_rejects_oversize_and_non_objects() -> None:
    with pytest.raises(ValueError, match="over 2048"):
        decode_window(b" " * (MAX_WINDOW_BYTES + 1))
    with pytest.raises(ValueError, match="JSON object"):
        decode_window(b"[1, 2]")
    with pytest.raises(ValueError):
        decode_window(b"\xff\xd8\xff\xe0 not json")


def test_encode_refuses_non_finite_sums() -> None:
    window = _window(moments={"brightness": Moments(398, float("nan"), 1.0)})
    with pytest.raises(ValueError):
        encode_window(window)


def test_moments_mean_and_variance() -> None:
    m = Moments(4, 10.0, 30.0)  # values 1, 2, 3, 4
    assert m.mean == 2.5
    assert m.variance == pytest.approx(5.0 / 3.0)
    assert Moments(1, 3.0, 9.0).variance != Moments(1, 3.0, 9.0).variance  # NaN


def test_edges_id_names_the_edges_not_their_order() -> None:
    a = {"x": [0.0, 1.0], "y": [0.0, 2.0]}
    b = {"y": [0, 2], "x": [0, 1]}
    assert edges_id(a) == edges_id(b)
    assert edges_id(a) != edges_id({"x": [0.0, 1.0], "y": [0.0, 2.5]})
    assert len(edges_id(a)) == 16


def test_floor_constants_are_the_contract() -> None:
    assert MIN_WINDOW_FRAMES == 50
    assert MIN_FRAMES_PER_BIN == 10


def test_a_seq_beyond_64_bits_is_refused() -> None:
    """A window whose seq does not fit a database's 64-bit column is a decode error, not a
    crash of the ingest thread later."""
    document = json.loads(encode_window(_window()))
    document["seq"] = 2**63
    with pytest.raises(ValueError, match="seq"):
        decode_window(json.dumps(document).encode())
