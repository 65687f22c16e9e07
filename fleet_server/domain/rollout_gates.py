"""Judging one rollout wave on the model's health, pure.

The store gathers, per device of the wave, what the device reported (``DeviceHealth``:
its rollout status, the figures of its ``gate_passed`` event, telemetry totals before and
after the switch, drift alerts opened since); ``judge_wave`` turns that and the limits
(``GateLimits``) into a verdict: wait, pass or fail, with one ``GateResult`` per gate.

Order of judgement:

1. Activation: when the devices that failed, were refused or rolled back on-device make
   ``min_activated_fraction`` unreachable, the wave fails at once. Otherwise it waits
   until every device has a final status (or the timeout).
2. Observation: ``observe_s`` after the wave's last activation, and until every activated
   device has sent ``min_frames`` frames with the new model.
3. Health gates, all judged together: gate pass rate, agreement, p99 latency, error rate,
   fail-rate change, new drift alerts.

A wave not judged ``timeout_s`` after its assignment fails its ``timeout`` gate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from edge_agent.protocol.telemetry import LATENCY_EDGES_MS
from fleet_server.domain.rollout import GateLimits

# Float fractions (2/3 of 3 devices) must not fail a limit they meet exactly.
_EPSILON: Final = 1e-9

GATE_NAMES: Final = (
    "activated",
    "gate_pass_rate",
    "agreement",
    "p99_latency_ms",
    "error_rate",
    "fail_rate_change",
    "new_drift_alerts",
    "timeout",
)


@dataclass(frozen=True, slots=True)
class WindowTotals:
    """Telemetry totals of one device over a set of windows. ``latency``: summed counts on
    ``LATENCY_EDGES_MS`` (with under- and overflow bins), None when no window had one."""

    frames: int = 0
    fails: int = 0
    errors: int = 0
    latency: tuple[int, ...] | None = None

    def add(self, counts: Mapping[str, int], latency: Sequence[int] | None) -> WindowTotals:
        """These totals plus one window (its verdict ``counts`` and latency histogram)."""
        frames = sum(int(counts.get(k, 0)) for k in ("pass", "fail", "uncertain", "error"))
        summed = self.latency
        if latency is not None:
            if summed is None:
                summed = tuple(int(c) for c in latency)
            elif len(summed) == len(latency):
                summed = tuple(a + int(b) for a, b in zip(summed, latency, strict=True))
        return WindowTotals(
            self.frames + frames,
            self.fails + int(counts.get("fail", 0)),
            self.errors + int(counts.get("error", 0)),
            summed,
        )


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """One device of a wave, as the gates see it.

    ``status``: assigned (still updating, including a retryable failure), activated,
    failed (refused or gate failed on the device) or rolled_back (on the device).
    ``gate_figures``: of its last ``gate_passed`` event for the release (empty if none).
    """

    device_id: str
    status: str
    reason: str | None = None
    activated_at: datetime | None = None
    gate_passed: bool = False
    gate_figures: Mapping[str, float] = field(default_factory=dict)
    before: WindowTotals = WindowTotals()
    after: WindowTotals = WindowTotals()
    new_drift_alerts: int = 0


@dataclass(frozen=True, slots=True)
class GateResult:
    name: str
    value: float | None
    limit: float
    passed: bool
    detail: str

    def document(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "limit": self.limit,
            "passed": self.passed,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Judgement:
    """``verdict``: wait (judge again later), pass or fail. ``observing``: every device
    has its final status and the wave is watching telemetry. ``reason``: one line."""

    verdict: Literal["wait", "pass", "fail"]
    results: tuple[GateResult, ...]
    reason: str
    observing: bool

    def documents(self) -> dict[str, dict[str, Any]]:
        return {r.name: r.document() for r in self.results}


def judge_wave(
    limits: GateLimits, devices: Sequence[DeviceHealth], *, started_at: datetime, now: datetime
) -> Judgement:
    """Judge a wave assigned at ``started_at`` (rules in the module doc).

    Raises:
        ValueError: ``devices`` is empty.
    """
    if not devices:
        raise ValueError("a wave has at least one device")
    size = len(devices)
    timed_out = now >= started_at + timedelta(seconds=limits.timeout_s)
    activated = [d for d in devices if d.status == "activated"]
    failed = [d for d in devices if d.status in ("failed", "rolled_back")]
    pending = size - len(activated) - len(failed)

    fraction = len(activated) / size
    reachable = (size - len(failed)) / size
    activation = GateResult(
        "activated",
        round(fraction, 6),
        limits.min_activated_fraction,
        fraction + _EPSILON >= limits.min_activated_fraction,
        _activation_detail(activated, failed, pending),
    )
    results = [activation, *_health_results(limits, devices, activated)]
    if reachable + _EPSILON < limits.min_activated_fraction:
        return _fail(results, activation.detail, observing=False)
    if pending and not timed_out:
        return Judgement("wait", tuple(results), f"waiting for {pending} of {size} devices", False)
    if not activation.passed:  # timed out with too few activated
        results.append(_timeout(limits, f"{pending} of {size} devices never reported"))
        return _fail(results, f"timeout: {pending} of {size} devices never reported", False)

    last_switch = max((d.activated_at for d in activated if d.activated_at), default=started_at)
    observe_until = last_switch + timedelta(seconds=limits.observe_s)
    short = [d for d in activated if d.after.frames < limits.min_frames]
    if not timed_out and (now < observe_until or short):
        waiting = (
            f"observing until {observe_until.isoformat()}"
            if now < observe_until
            else f"waiting for {limits.min_frames} frames from {len(short)} device(s)"
        )
        return Judgement("wait", tuple(results), waiting, True)
    if short:
        worst = min(short, key=lambda d: (d.after.frames, d.device_id))
        detail = (
            f"{len(short)} device(s) below {limits.min_frames} frames after the switch "
            f"(fewest: {worst.device_id} with {worst.after.frames})"
        )
        results.append(_timeout(limits, detail))
    failing = [r for r in results if not r.passed]
    if failing:
        return _fail(results, "; ".join(f"{r.name}: {r.detail}" for r in failing), True)
    return Judgement("pass", tuple(results), "every gate passed", True)


def p99_upper_ms(latency: Sequence[int]) -> float | None:
    """The upper edge (ms) of the latency bin holding the 99th percentile; None when it
    is the overflow bin (above the last edge) or the histogram is empty."""
    total = sum(latency)
    if total <= 0:
        return None
    needed = 0.99 * total
    running = 0
    for i, count in enumerate(latency):
        running += count
        if running + _EPSILON >= needed:
            return LATENCY_EDGES_MS[i] if i < len(LATENCY_EDGES_MS) else None
    return None


def _fail(results: list[GateResult], reason: str, observing: bool) -> Judgement:
    return Judgement("fail", tuple(results), reason, observing)


def _timeout(limits: GateLimits, detail: str) -> GateResult:
    return GateResult("timeout", limits.timeout_s, limits.timeout_s, False, detail)


def _activation_detail(
    activated: Sequence[DeviceHealth], failed: Sequence[DeviceHealth], pending: int
) -> str:
    text = f"{len(activated)} activated, {len(failed)} failed, {pending} updating"
    if failed:
        first = sorted(failed, key=lambda d: d.device_id)[0]
        text += f" (e.g. {first.device_id}: {first.reason or first.status})"
    return text


def _health_results(
    limits: GateLimits, devices: Sequence[DeviceHealth], activated: Sequence[DeviceHealth]
) -> list[GateResult]:
    size = len(devices)
    passed_gate = sum(1 for d in devices if d.gate_passed)
    rate = passed_gate / size
    results = [
        GateResult(
            "gate_pass_rate",
            round(rate, 6),
            limits.min_gate_pass_rate,
            rate + _EPSILON >= limits.min_gate_pass_rate,
            f"{passed_gate} of {size} devices passed the on-device health gate",
        ),
        _agreement(limits, activated),
        _latency(limits, activated),
        _worst_rate(
            "error_rate",
            limits.max_error_rate,
            {d.device_id: _rate(d.after.errors, d.after.frames) for d in activated},
            "error verdicts per frame after the switch",
        ),
        _worst_rate(
            "fail_rate_change",
            limits.max_fail_rate_change,
            {
                d.device_id: abs(
                    (_rate(d.after.fails, d.after.frames) or 0.0)
                    - (_rate(d.before.fails, d.before.frames) or 0.0)
                )
                for d in activated
                if d.before.frames and d.after.frames
            },
            "|fail rate after - before the switch|",
        ),
    ]
    new_alerts = sum(d.new_drift_alerts for d in activated)
    with_alerts = sorted(d.device_id for d in activated if d.new_drift_alerts)
    results.append(
        GateResult(
            "new_drift_alerts",
            float(new_alerts),
            float(limits.max_new_drift_alerts),
            new_alerts <= limits.max_new_drift_alerts,
            f"{new_alerts} drift alert(s) opened after the switch"
            + (f" on {', '.join(with_alerts[:5])}" if with_alerts else ""),
        )
    )
    return results


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _worst_rate(
    name: str, limit: float, by_device: Mapping[str, float | None], what: str
) -> GateResult:
    known = {d: v for d, v in by_device.items() if v is not None}
    if not known:
        return GateResult(name, None, limit, True, f"not measured yet ({what})")
    device, value = max(known.items(), key=lambda kv: (kv[1], kv[0]))
    return GateResult(
        name,
        round(value, 6),
        limit,
        value <= limit + _EPSILON,
        f"worst {device}: {value:.4f} ({what})",
    )


def _agreement(limits: GateLimits, activated: Sequence[DeviceHealth]) -> GateResult:
    figures = {
        d.device_id: d.gate_figures["agreement"] for d in activated if "agreement" in d.gate_figures
    }
    if not figures:
        return GateResult(
            "agreement",
            None,
            limits.min_agreement,
            True,
            "no shadow-run agreement reported (no previous model to compare with)",
        )
    device, value = min(figures.items(), key=lambda kv: (kv[1], kv[0]))
    return GateResult(
        "agreement",
        round(value, 6),
        limits.min_agreement,
        value + _EPSILON >= limits.min_agreement,
        f"lowest {device}: {value:.4f} agreement with the previous model in the shadow run",
    )


def _latency(limits: GateLimits, activated: Sequence[DeviceHealth]) -> GateResult:
    worst: tuple[float, str, str] | None = None  # (ms, device, source)
    for device in activated:
        gate = device.gate_figures.get("p99_latency_ms")
        candidates: list[tuple[float, str]] = []
        if gate is not None:
            candidates.append((gate, "health gate"))
        if device.after.latency is not None and sum(device.after.latency) > 0:
            upper = p99_upper_ms(device.after.latency)
            if upper is None:
                return GateResult(
                    "p99_latency_ms",
                    None,
                    limits.max_p99_latency_ms,
                    False,
                    f"{device.device_id}: p99 above {LATENCY_EDGES_MS[-1]} ms in telemetry",
                )
            candidates.append((upper, "telemetry"))
        for ms, source in candidates:
            if worst is None or ms > worst[0]:
                worst = (ms, device.device_id, source)
    if worst is None:
        return GateResult(
            "p99_latency_ms", None, limits.max_p99_latency_ms, True, "not measured yet"
        )
    ms, device_id, source = worst
    return GateResult(
        "p99_latency_ms",
        round(ms, 3),
        limits.max_p99_latency_ms,
        ms <= limits.max_p99_latency_ms + _EPSILON,
        f"worst {device_id}: {ms:.1f} ms ({source})",
    )
