"""From model outputs to a verdict: P(defect), then pass / fail / uncertain."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt

from edge_agent.protocol.manifest import Activation, Decision, OutputSpec


class Outcome(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    UNCERTAIN = "uncertain"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result for one frame. ``error`` holds the reason when outcome is ERROR."""

    frame_id: int
    label: str
    p_defect: float
    outcome: Outcome
    latency_ms: float
    error: str | None = None


_SMALL = 16


class OutputError(ValueError):
    """Model outputs do not fit the manifest's output spec, or are not finite."""


def probabilities(outputs: npt.NDArray[np.float32], spec: OutputSpec) -> npt.NDArray[np.float64]:
    """Class probabilities from the raw outputs of one frame, in ``spec.labels`` order.

    Raises:
        OutputError: wrong number of outputs or a non-finite value.
    """
    flat = np.asarray(outputs, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise OutputError("model output is not finite (NaN or Inf)")
    n = len(spec.labels)
    if spec.activation is Activation.SIGMOID:
        if flat.size == 1:
            p = _sigmoid(float(flat[0]))
        elif flat.size == n:
            p = _sigmoid(float(flat[spec.defect_index]))
        else:
            raise OutputError(f"sigmoid output has {flat.size} values, expected 1 or {n}")
        probs = np.empty(2)
        probs[spec.defect_index] = p
        probs[1 - spec.defect_index] = 1.0 - p
        return probs
    if flat.size != n:
        raise OutputError(f"model gives {flat.size} outputs, manifest lists {n} labels")
    if spec.activation is Activation.SOFTMAX:
        e = np.exp(flat - flat.max())
        soft: npt.NDArray[np.float64] = e / e.sum()
        return soft
    clipped: npt.NDArray[np.float64] = np.clip(flat, 0.0, 1.0)
    return clipped


def _sigmoid(x: float) -> float:
    # Two branches so that exp never overflows for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def decide(p_defect: float, decision: Decision) -> Outcome:
    if math.isnan(p_defect):
        return Outcome.ERROR
    if p_defect >= decision.t_fail:
        return Outcome.FAIL
    if p_defect >= decision.t_uncertain:
        return Outcome.UNCERTAIN
    return Outcome.PASS


def judge(
    outputs: npt.NDArray[np.float32],
    spec: OutputSpec,
    decision: Decision,
    frame_id: int,
    latency_ms: float,
) -> Verdict:
    """Turn one frame's raw outputs into a Verdict; bad outputs give an ERROR verdict."""
    if outputs.size <= _SMALL and spec.activation is Activation.SOFTMAX:
        # The common case (a few logits) in plain Python: NumPy's per-call overhead on a
        # two-element array costs more than the arithmetic, on every frame.
        values = outputs.reshape(-1).tolist()
        if len(values) == len(spec.labels) and all(map(math.isfinite, values)):
            top = max(values)
            exps = [math.exp(v - top) for v in values]
            p = exps[spec.defect_index] / sum(exps)
            label = spec.labels[values.index(top)]
            return Verdict(frame_id, label, p, decide(p, decision), latency_ms)
    try:
        probs = probabilities(outputs, spec)
    except OutputError as e:
        return error_verdict(frame_id, str(e), latency_ms)
    p = float(probs[spec.defect_index])
    label = spec.labels[int(np.argmax(probs))]
    return Verdict(frame_id, label, p, decide(p, decision), latency_ms)


def error_verdict(frame_id: int, reason: str, latency_ms: float = 0.0) -> Verdict:
    return Verdict(frame_id, "", math.nan, Outcome.ERROR, latency_ms, reason)
