"""Rollout policy, pure: the rollout state machine, wave planning, target selection with
skip reasons, and the per-wave health gates.

A rollout takes one release to the devices its target selects, in cumulative waves (for
example one canary device, then 10 %, 50 % and 100 % of the targeted devices), and judges
each wave on the model's own health before the next one starts. Everything here takes
data and time as arguments; the store and the service do the I/O.

Raises ``RolloutError`` (a ``ValueError``) for bad input, naming the field, and its
subclasses ``NotFound`` and ``Conflict`` (an action the current state does not allow).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

from edge_agent.config import FirmwareProfile
from fleet_server.compatibility import CompatibilityError, check_assignment


class RolloutError(ValueError):
    """A rollout request or action is invalid; the message names the field or value."""


class NotFound(RolloutError):
    """No such rollout, release or device."""


class Conflict(RolloutError):
    """The action does not fit the current state (an illegal transition, nothing to roll
    out or back, a read-only service)."""


ROLLOUT_STATES: Final = (
    "pending",
    "running",
    "paused",
    "halted",
    "completed",
    "aborted",
    "rolled_back",
)
# A rollout in one of these states is stepped by the driver (or waits for an operator).
ACTIVE_STATES: Final = ("pending", "running", "paused", "halted")
WAVE_STATES: Final = (
    "pending",
    "assigned",
    "observing",
    "passed",
    "failed",
    "rolled_back",
    "aborted",
)
DEVICE_STATES: Final = ("skipped", "pending", "assigned", "activated", "failed", "rolled_back")

# action -> (states it is allowed in, the state it leads to)
_TRANSITIONS: Final[Mapping[str, tuple[frozenset[str], str]]] = {
    "start": (frozenset({"pending"}), "running"),
    "pause": (frozenset({"pending", "running"}), "paused"),
    "resume": (frozenset({"paused"}), "running"),
    "halt": (frozenset({"running", "paused"}), "halted"),
    "complete": (frozenset({"running"}), "completed"),
    "abort": (frozenset({"pending", "running", "paused", "halted"}), "aborted"),
    # A finished or stopped rollout can still be undone by hand.
    "rollback": (frozenset({"running", "paused", "halted", "completed", "aborted"}), "rolled_back"),
}


def transition(state: str, action: str) -> str:
    """The state a rollout in ``state`` moves to on ``action``.

    Actions: start, pause, resume, halt, complete, abort, rollback. A halted rollout is
    not resumed (its gate failed): it is rolled back or aborted.

    Raises:
        RolloutError: unknown action or state.
        Conflict: ``action`` is not allowed in ``state``.
    """
    if state not in ROLLOUT_STATES:
        raise RolloutError(f"unknown rollout state {state!r}")
    rule = _TRANSITIONS.get(action)
    if rule is None:
        raise RolloutError(f"unknown rollout action {action!r}")
    allowed, after = rule
    if state not in allowed:
        raise Conflict(
            f"cannot {action} a rollout that is {state} "
            f"(allowed when {', '.join(s for s in ROLLOUT_STATES if s in allowed)})"
        )
    return after


# -- targets and waves --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RolloutTarget:
    """Which devices a rollout is for.

    Each field lists values of one kind: ``groups`` (the device's line), ``sites``,
    ``profiles`` (firmware profile names) and ``devices`` (ids). A device is selected
    when it matches every kind that is given (AND across kinds) and any one value of
    each such kind (OR within a kind). All empty: the whole fleet.
    """

    groups: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()

    def document(self) -> dict[str, list[str]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> RolloutTarget:
        """Raises RolloutError: an unknown key or a value that is not a list of strings."""
        known = {f.name for f in fields(cls)}
        values: dict[str, tuple[str, ...]] = {}
        for key, value in document.items():
            if key not in known:
                raise RolloutError(
                    f"target: unknown key {key!r} (known: {', '.join(sorted(known))})"
                )
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise RolloutError(f"target.{key} must be a list of strings")
            values[key] = tuple(value)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class WaveSpec:
    """One wave of the plan: exactly one of ``devices`` (a count) and ``percent`` (of the
    targeted devices, rounded up). Figures are CUMULATIVE: "1 device, 10 %, 50 %, 100 %"
    means the first wave holds 1 device, the second brings the total to 10 % of the
    targeted devices, and so on.

    Raises:
        RolloutError: neither or both given, ``devices`` < 1, ``percent`` outside (0, 100].
    """

    devices: int | None = None
    percent: float | None = None

    def __post_init__(self) -> None:
        if (self.devices is None) == (self.percent is None):
            raise RolloutError("wave: give exactly one of 'devices' and 'percent'")
        if self.devices is not None and (isinstance(self.devices, bool) or self.devices < 1):
            raise RolloutError(f"wave.devices must be at least 1, got {self.devices}")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise RolloutError(f"wave.percent must be in (0, 100], got {self.percent}")

    def document(self) -> dict[str, float | int]:
        return (
            {"devices": self.devices}
            if self.devices is not None
            else {"percent": self.percent or 0.0}
        )

    def cumulative(self, total: int) -> int:
        """Devices covered up to and including this wave, out of ``total``."""
        if self.devices is not None:
            return min(total, self.devices)
        # The small epsilon keeps 10 % of 30 at 3, not 4, despite float rounding.
        return min(total, max(1, math.ceil((self.percent or 0.0) * total / 100 - 1e-9)))


def plan_waves(total: int, specs: Sequence[WaveSpec]) -> list[int]:
    """Wave sizes (not cumulative) for ``total`` targeted devices.

    A wave that adds no device (10 % of 3 devices after a 1-device canary) is dropped, so
    every planned wave has at least one device.

    Raises:
        RolloutError: no waves, or the last wave does not reach all ``total`` devices.
        Conflict: ``total`` is 0 (nothing to roll out).
    """
    if not specs:
        raise RolloutError("waves: give at least one wave")
    if total <= 0:
        raise Conflict("no device to roll out to: every selected device was skipped")
    sizes: list[int] = []
    covered = 0
    for spec in specs:
        reach = max(covered, spec.cumulative(total))
        if reach > covered:
            sizes.append(reach - covered)
            covered = reach
    if covered < total:
        raise RolloutError(
            f"waves: the last wave must reach all {total} targeted devices "
            f"(100%); the plan reaches {covered}"
        )
    return sizes


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What target selection needs to know of a device."""

    id: str
    line: str | None
    site: str | None
    profile: str | None
    model: str | None
    online: bool


@dataclass(frozen=True, slots=True)
class ReleaseFacts:
    """The release being rolled out: its target path, ``name@version`` and the custom
    fields the release role signed (runtime, profiles)."""

    target_path: str
    model: str
    runtime: str
    profiles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Skip:
    device_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Selection:
    """Targeted device ids in wave order, and the skipped devices with their reasons."""

    targeted: tuple[str, ...]
    skipped: tuple[Skip, ...]


def select_targets(
    release: ReleaseFacts,
    target: RolloutTarget,
    devices: Sequence[DeviceFacts],
    profiles: Mapping[str, FirmwareProfile],
) -> Selection:
    """The devices ``target`` selects that can take ``release``, in wave order.

    Wave order puts online devices first (a canary that is offline would only time out),
    then orders by device id, so a plan is reproducible. Selected devices are skipped,
    with the reason, when: the device has reported no firmware profile; its profile is
    unknown to the server; the release is not for its profile or needs a runtime the
    profile lacks; it already runs the release. Ids listed in ``target.devices`` that
    match no known device are skipped as unknown.
    """
    known = {d.id for d in devices}
    skipped = [Skip(d, "unknown device") for d in target.devices if d not in known]
    fits: list[DeviceFacts] = []
    custom = {"runtime": release.runtime, "profiles": list(release.profiles)}
    for device in devices:
        if not _matches(target, device):
            continue
        reason = _skip_reason(release, device, profiles, custom)
        if reason is None:
            fits.append(device)
        else:
            skipped.append(Skip(device.id, reason))
    fits.sort(key=lambda d: (not d.online, d.id))
    return Selection(tuple(d.id for d in fits), tuple(sorted(skipped, key=lambda s: s.device_id)))


def _matches(target: RolloutTarget, device: DeviceFacts) -> bool:
    return all(
        not wanted or value in wanted
        for wanted, value in (
            (target.groups, device.line),
            (target.sites, device.site),
            (target.profiles, device.profile),
            (target.devices, device.id),
        )
    )


def _skip_reason(
    release: ReleaseFacts,
    device: DeviceFacts,
    profiles: Mapping[str, FirmwareProfile],
    custom: Mapping[str, object],
) -> str | None:
    if device.model == release.model:
        return f"already runs {release.model}"
    if device.profile is None:
        return "no known firmware profile (the device has not reported one)"
    profile = profiles.get(device.profile)
    if profile is None:
        return f"firmware profile {device.profile!r} is unknown to the server"
    try:
        check_assignment(release.model, custom, profile)
    except CompatibilityError as e:
        return str(e)
    return None


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """What an operator asks for: the target, the wave plan, the gates, the pause between
    waves (seconds after a wave passed before the next is assigned) and whether a failed
    gate rolls the rollout back by itself.

    Raises:
        RolloutError: no waves, or ``pause_s`` negative or not finite.
    """

    target: RolloutTarget
    waves: tuple[WaveSpec, ...]
    gates: GateLimits
    pause_s: float
    auto_rollback: bool

    def __post_init__(self) -> None:
        if not self.waves:
            raise RolloutError("waves: give at least one wave")
        if (
            not isinstance(self.pause_s, int | float)
            or not math.isfinite(self.pause_s)
            or self.pause_s < 0
        ):
            raise RolloutError(f"pause_s must be a number >= 0, got {self.pause_s!r}")


# -- gates --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GateLimits:
    """Thresholds a wave must meet before the next wave starts.

    Fractions and rates are in 0..1. Per-device figures are judged on the worst device of
    the wave (one device's broken camera pipeline or worse model is what a canary is for).

    - ``min_activated_fraction``: of the wave's devices that must report ``activated``;
      devices whose update failed, was refused or rolled back on the device count against
      it (a retryable ``failed`` still has until the timeout).
    - ``min_gate_pass_rate``: devices whose on-device health gate passed (a
      ``gate_passed`` event for the release) over the wave size.
    - ``min_agreement``: the lowest shadow-run agreement with the previous model reported
      in a ``gate_passed`` event of the wave.
    - ``max_p99_latency_ms``: the highest p99 inference latency, from the gate figures and
      from the telemetry latency histogram after the switch (the upper edge of the bin
      holding the 99th percentile, so it never understates).
    - ``max_error_rate``: error verdicts per frame in a device's windows after the switch.
    - ``max_fail_rate_change``: ``|fail rate after - fail rate before|`` of a device,
      before = its windows with the previous model, after = with the new one.
    - ``max_new_drift_alerts``: drift alerts opened on the wave's devices after their
      switch that were not open before, summed over the wave.
    - ``observe_s``: seconds to watch after the wave's last activation before judging the
      telemetry gates.
    - ``min_frames``: frames after the switch each activated device needs before it is
      judged (the wave waits for them, up to ``timeout_s``).
    - ``timeout_s``: seconds from the wave's assignment; a wave not judged by then fails
      its ``timeout`` gate.

    Raises:
        RolloutError: a value out of range (names the field).
    """

    min_activated_fraction: float = 1.0
    min_gate_pass_rate: float = 1.0
    min_agreement: float = 0.98
    max_p99_latency_ms: float = 50.0
    max_error_rate: float = 0.01
    max_fail_rate_change: float = 0.05
    max_new_drift_alerts: int = 0
    observe_s: float = 60.0
    min_frames: int = 500
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        for name in ("min_activated_fraction", "min_gate_pass_rate", "min_agreement"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("max_error_rate", "max_fail_rate_change"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("max_p99_latency_ms", "timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise RolloutError(f"gates.{name} must be a positive number, got {value!r}")
        for name in ("observe_s",):
            _check_range(name, getattr(self, name), 0.0, math.inf)
        for name in ("max_new_drift_alerts", "min_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RolloutError(f"gates.{name} must be a whole number >= 0, got {value!r}")
        if self.observe_s >= self.timeout_s:
            raise RolloutError(
                f"gates.observe_s ({self.observe_s}) must be shorter than gates.timeout_s "
                f"({self.timeout_s})"
            )

    def document(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> GateLimits:
        """Raises RolloutError: an unknown key or a value out of range."""
        known = {f.name for f in fields(cls)}
        for key in document:
            if key not in known:
                raise RolloutError(
                    f"gates: unknown key {key!r} (known: {', '.join(sorted(known))})"
                )
        return cls(**dict(document))


def _check_range(name: str, value: object, low: float, high: float) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or math.isnan(value)
        or not low <= value <= high
    ):
        raise RolloutError(f"gates.{name} must be a number in [{low}, {high}], got {value!r}")
