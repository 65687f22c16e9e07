"""Parsing the console's "start a rollout" form into the rollout service's types.

Pure. Every error is a ``FormError`` whose message names the form field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from fleet_server.domain.rollout import GateLimits, RolloutError, RolloutTarget, WaveSpec

MAX_WAVES = 20
MAX_PAUSE_S = 7 * 24 * 3600.0
_WAVE = re.compile(r"^(\d+(?:\.\d+)?)(%?)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,95}$")
# Gate fields the form offers, with the type each one takes.
GATE_FIELDS: dict[str, type] = {
    "min_agreement": float,
    "max_p99_latency_ms": float,
    "max_error_rate": float,
    "max_fail_rate_change": float,
    "observe_s": float,
    "min_frames": int,
}


class FormError(ValueError):
    """A form field is missing or invalid; the message names it."""


@dataclass(frozen=True, slots=True)
class RolloutForm:
    release: str
    target: RolloutTarget
    waves: tuple[WaveSpec, ...]
    gates: GateLimits
    pause_s: float
    auto_rollback: bool


def parse_waves(text: str) -> tuple[WaveSpec, ...]:
    """``"1, 10%, 50%, 100%"``: a plain number is a device count, ``N%`` a cumulative
    percentage of the targeted devices.

    Raises:
        FormError: empty, more than MAX_WAVES waves, or a wave that is neither.
    """
    items = [item.strip() for item in text.replace(";", ",").split(",") if item.strip()]
    if not items:
        raise FormError("waves: give at least one wave, e.g. '1, 10%, 100%'")
    if len(items) > MAX_WAVES:
        raise FormError(f"waves: at most {MAX_WAVES} waves, got {len(items)}")
    waves = []
    for item in items:
        match = _WAVE.match(item.replace(" ", ""))
        if match is None:
            raise FormError(f"waves: {item!r} is neither a device count nor a percentage")
        number, percent = match.groups()
        try:
            if percent:
                waves.append(WaveSpec(percent=float(number)))
            elif "." in number:
                raise FormError(f"waves: {item!r}: a device count is a whole number")
            else:
                waves.append(WaveSpec(devices=int(number)))
        except RolloutError as e:
            raise FormError(f"waves: {item!r}: {e}") from e
    return tuple(waves)


def parse_rollout_form(form: Mapping[str, str]) -> RolloutForm:
    """The rollout to create from the form's fields: ``release`` (name@version),
    ``group``, ``site``, ``profile`` (optional target filters), ``devices`` (optional,
    comma-separated ids), ``waves``, ``pause_s``, ``auto_rollback`` ("on" when ticked)
    and the optional gate fields in GATE_FIELDS (empty: the default).

    Raises:
        FormError: naming the first bad field.
    """
    release = form.get("release", "").strip()
    if not release or not _NAME.match(release):
        raise FormError("release: choose a release")
    target_values: dict[str, tuple[str, ...]] = {}
    for field, key in (("group", "groups"), ("site", "sites"), ("profile", "profiles")):
        value = form.get(field, "").strip()
        if value:
            if not _NAME.match(value):
                raise FormError(f"{field}: {value!r} is not a valid name")
            target_values[key] = (value,)
    devices = tuple(d.strip() for d in form.get("devices", "").split(",") if d.strip())
    for device in devices:
        if not _NAME.match(device):
            raise FormError(f"devices: {device!r} is not a valid device id")
    if devices:
        target_values["devices"] = devices
    pause_s = _number(form, "pause_s", 0.0)
    if not 0 <= pause_s <= MAX_PAUSE_S:
        raise FormError(f"pause_s: must be 0..{MAX_PAUSE_S:.0f} seconds, got {pause_s:g}")
    gates: dict[str, float | int] = {}
    for name, kind in GATE_FIELDS.items():
        raw = form.get(name, "").strip()
        if not raw:
            continue
        number = _number(form, name, 0.0)
        if kind is int:
            if number != int(number):
                raise FormError(f"{name}: must be a whole number, got {raw!r}")
            gates[name] = int(number)
        else:
            gates[name] = number
    try:
        limits = GateLimits(**gates)  # type: ignore[arg-type]
    except RolloutError as e:
        raise FormError(str(e)) from e
    return RolloutForm(
        release=release,
        target=RolloutTarget(**target_values),
        waves=parse_waves(form.get("waves", "")),
        gates=limits,
        pause_s=pause_s,
        auto_rollback=form.get("auto_rollback", "") in ("on", "true", "1", "yes"),
    )


def _number(form: Mapping[str, str], name: str, default: float) -> float:
    raw = form.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise FormError(f"{name}: {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise FormError(f"{name}: {raw!r} is not a finite number")
    return value
