"""Tests for edge_agent.core.verdict: probabilities, thresholds and error verdicts."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.core.verdict import (
    Outcome,
    OutputError,
    Verdict,
    decide,
    error_verdict,
    judge,
    probabilities,
)
from edge_agent.protocol.manifest import Activation, Decision, OutputSpec

LN3 = math.log(3.0)

DECISION = Decision(t_fail=0.7, t_uncertain=0.4)
SOFTMAX = OutputSpec(labels=["ok", "defect"], defect_label="defect", activation=Activation.SOFTMAX)
SIGMOID = OutputSpec(labels=["ok", "defect"], defect_label="defect", activation=Activation.SIGMOID)
SIGMOID_FIRST = OutputSpec(
    labels=["defect", "ok"], defect_label="defect", activation=Activation.SIGMOID
)
NONE = OutputSpec(labels=["ok", "defect"], defect_label="defect", activation=Activation.NONE)
THREE = OutputSpec(
    labels=["ok", "scratch", "dent"], defect_label="dent", activation=Activation.SOFTMAX
)


def _out(*values: float) -> npt.NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


def _below(x: float) -> float:
    return float(np.nextafter(x, -math.inf))


# --- decide ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "t_fail", "t_uncertain", "outcome"),
    [
        (0.7, 0.7, 0.4, Outcome.FAIL),  # p == t_fail
        (_below(0.7), 0.7, 0.4, Outcome.UNCERTAIN),
        (0.4, 0.7, 0.4, Outcome.UNCERTAIN),  # p == t_uncertain
        (_below(0.4), 0.7, 0.4, Outcome.PASS),
        (1.0, 0.7, 0.4, Outcome.FAIL),
        (0.0, 0.7, 0.4, Outcome.PASS),
        (0.5, 0.5, 0.5, Outcome.FAIL),  # no uncertain band
        (_below(0.5), 0.5, 0.5, Outcome.PASS),
        (0.0, 0.5, 0.0, Outcome.UNCERTAIN),  # t_uncertain 0: nothing passes
        (1.0, 1.0, 0.9, Outcome.FAIL),
        (_below(1.0), 1.0, 0.9, Outcome.UNCERTAIN),
    ],
)
def test_decide_at_boundaries(
    p: float, t_fail: float, t_uncertain: float, outcome: Outcome
) -> None:
    assert decide(p, Decision(t_fail=t_fail, t_uncertain=t_uncertain)) is outcome


# --- probabilities -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "outputs", "expected"),
    [
        pytest.param(SOFTMAX, _out(0.0, LN3), [0.25, 0.75], id="softmax-ln3"),
        pytest.param(SOFTMAX, _out(2.0, 2.0), [0.5, 0.5], id="softmax-equal"),
        pytest.param(
            SOFTMAX,
            _out(1000.0, 1001.0),
            [1 / (1 + math.e), math.e / (1 + math.e)],
            id="softmax-huge",
        ),
        pytest.param(SOFTMAX, _out(-1000.0, 0.0), [0.0, 1.0], id="softmax-saturated"),
        pytest.param(THREE, _out(1.0, 1.0, 1.0), [1 / 3, 1 / 3, 1 / 3], id="softmax-three"),
        pytest.param(THREE, _out(0.0, LN3, 2 * LN3), [1 / 13, 3 / 13, 9 / 13], id="softmax-1-3-9"),
        pytest.param(SOFTMAX, np.array([[0.0, LN3]], np.float32), [0.25, 0.75], id="batch-axis"),
        pytest.param(SIGMOID, _out(0.0), [0.5, 0.5], id="sigmoid-one-zero"),
        pytest.param(SIGMOID, _out(LN3), [0.25, 0.75], id="sigmoid-one"),
        pytest.param(SIGMOID, _out(-LN3), [0.75, 0.25], id="sigmoid-one-negative"),
        pytest.param(SIGMOID_FIRST, _out(LN3), [0.75, 0.25], id="sigmoid-defect-first"),
        pytest.param(SIGMOID, _out(5.0, LN3), [0.25, 0.75], id="sigmoid-two-uses-defect"),
        pytest.param(SIGMOID_FIRST, _out(LN3, 5.0), [0.75, 0.25], id="sigmoid-two-defect-first"),
        pytest.param(SIGMOID, _out(1000.0), [0.0, 1.0], id="sigmoid-huge"),
        pytest.param(NONE, _out(0.3, 0.6), [0.3, 0.6], id="none-kept-not-normalized"),
        pytest.param(NONE, _out(-0.2, 1.3), [0.0, 1.0], id="none-clipped"),
        pytest.param(NONE, _out(0.0, 1.0), [0.0, 1.0], id="none-edges"),
    ],
)
def test_probabilities(
    spec: OutputSpec, outputs: npt.NDArray[np.float32], expected: list[float]
) -> None:
    probs = probabilities(outputs, spec)
    assert probs.dtype == np.float64
    assert probs.shape == (len(spec.labels),)
    np.testing.assert_allclose(probs, np.array(expected), rtol=1e-6, atol=1e-7)


# Regression: math.exp(-x) overflows for a sigmoid logit below about -709, so a finite
# (and very confident "not defect") output raises OverflowError, which judge() does not catch.
@pytest.mark.parametrize("logit", [-710.0, -1000.0, -3.0e38])
def test_sigmoid_of_a_very_negative_logit(logit: float) -> None:
    np.testing.assert_allclose(probabilities(_out(logit), SIGMOID), [1.0, 0.0], atol=1e-12)
    verdict = judge(_out(logit), SIGMOID, DECISION, frame_id=1, latency_ms=0.0)
    assert verdict.outcome is Outcome.PASS
    assert verdict.label == "ok"


@pytest.mark.parametrize(
    ("spec", "outputs", "needles"),
    [
        pytest.param(SOFTMAX, _out(0.0, math.nan), ("not finite",), id="nan"),
        pytest.param(SOFTMAX, _out(math.inf, 0.0), ("not finite",), id="inf"),
        pytest.param(SIGMOID, _out(-math.inf), ("not finite",), id="sigmoid-minus-inf"),
        pytest.param(NONE, _out(math.nan, 0.5), ("not finite",), id="none-nan-not-clipped"),
        pytest.param(SOFTMAX, _out(0.0, 1.0, 2.0), ("3 outputs", "2 labels"), id="too-many"),
        pytest.param(SOFTMAX, _out(1.0), ("1 outputs", "2 labels"), id="too-few"),
        pytest.param(NONE, _out(), ("0 outputs", "2 labels"), id="empty"),
        pytest.param(THREE, _out(0.0, 1.0), ("2 outputs", "3 labels"), id="three-labels"),
        pytest.param(SIGMOID, _out(0.0, 1.0, 2.0), ("3 values", "1 or 2"), id="sigmoid-three"),
        pytest.param(SIGMOID, _out(), ("0 values", "1 or 2"), id="sigmoid-empty"),
    ],
)
def test_bad_outputs(
    spec: OutputSpec, outputs: npt.NDArray[np.float32], needles: tuple[str, ...]
) -> None:
    with pytest.raises(OutputError) as excinfo:
        probabilities(outputs, spec)
    for needle in needles:
        assert needle in str(excinfo.value)
    verdict = judge(outputs, spec, DECISION, frame_id=42, latency_ms=3.5)
    assert verdict.outcome is Outcome.ERROR
    assert verdict.frame_id == 42
    assert verdict.latency_ms == 3.5
    assert verdict.label == ""
    assert math.isnan(verdict.p_defect)
    assert verdict.error == str(excinfo.value)


def test_output_error_is_a_value_error() -> None:
    assert issubclass(OutputError, ValueError)


# --- judge -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "outputs", "label", "p_defect", "outcome"),
    [
        pytest.param(SOFTMAX, _out(0.0, LN3), "defect", 0.75, Outcome.FAIL, id="softmax-fail"),
        pytest.param(SOFTMAX, _out(LN3, 0.0), "ok", 0.25, Outcome.PASS, id="softmax-pass"),
        pytest.param(SIGMOID, _out(0.0), "ok", 0.5, Outcome.UNCERTAIN, id="sigmoid-tie"),
        pytest.param(SIGMOID_FIRST, _out(LN3), "defect", 0.75, Outcome.FAIL, id="defect-first"),
        pytest.param(NONE, _out(0.9, 0.45), "ok", 0.45, Outcome.UNCERTAIN, id="none-argmax-ok"),
        # The label is the most likely class, not the defect label.
        pytest.param(
            THREE, _out(0.0, 2 * LN3, LN3), "scratch", 3 / 13, Outcome.PASS, id="argmax-scratch"
        ),
        pytest.param(
            THREE, _out(0.0, LN3, 2 * LN3), "dent", 9 / 13, Outcome.UNCERTAIN, id="argmax-dent"
        ),
    ],
)
def test_judge(
    spec: OutputSpec,
    outputs: npt.NDArray[np.float32],
    label: str,
    p_defect: float,
    outcome: Outcome,
) -> None:
    verdict = judge(outputs, spec, DECISION, frame_id=7, latency_ms=1.25)
    assert verdict.label == label
    assert verdict.p_defect == pytest.approx(p_defect, rel=1e-6)
    assert verdict.outcome is outcome
    assert (verdict.frame_id, verdict.latency_ms, verdict.error) == (7, 1.25, None)
    assert isinstance(verdict.p_defect, float)


def test_judge_exact_threshold_from_none_activation() -> None:
    # 0.5 and 0.25 are exact in float32, so p lands on the thresholds exactly.
    decision = Decision(t_fail=0.5, t_uncertain=0.25)
    assert judge(_out(0.5, 0.5), NONE, decision, 0, 0.0).outcome is Outcome.FAIL
    assert judge(_out(0.75, 0.25), NONE, decision, 0, 0.0).outcome is Outcome.UNCERTAIN
    below = float(np.nextafter(np.float32(0.25), np.float32(0)))
    assert judge(_out(0.75, below), NONE, decision, 0, 0.0).outcome is Outcome.PASS


def test_error_verdict() -> None:
    verdict = error_verdict(9, "cannot decode image", 2.0)
    assert verdict.outcome is Outcome.ERROR
    assert (verdict.frame_id, verdict.label, verdict.error, verdict.latency_ms) == (
        9,
        "",
        "cannot decode image",
        2.0,
    )
    assert math.isnan(verdict.p_defect)
    assert error_verdict(1, "x").latency_ms == 0.0


def test_verdict_is_frozen() -> None:
    verdict = Verdict(1, "ok", 0.1, Outcome.PASS, 0.5)
    with pytest.raises(AttributeError):
        verdict.label = "defect"  # type: ignore[misc]
    assert verdict.error is None


def test_outcome_wire_values() -> None:
    assert [o.value for o in Outcome] == ["pass", "fail", "uncertain", "error"]


@given(
    st.lists(
        st.floats(min_value=-80, max_value=80, allow_nan=False, width=32),
        min_size=2,
        max_size=2,
    )
)
def test_fast_softmax_path_matches_numpy_path(logits: list[float]) -> None:
    spec = OutputSpec(labels=["ok", "defect"], defect_label="defect", activation=Activation.SOFTMAX)
    decision = Decision(t_fail=0.5, t_uncertain=0.2)
    outputs = np.array(logits, dtype=np.float32)
    fast = judge(outputs, spec, decision, 0, 0.0)
    probs = probabilities(outputs, spec)
    assert fast.p_defect == pytest.approx(float(probs[1]), abs=1e-9)
    assert fast.outcome is decide(float(probs[1]), decision)
