"""Request and response bodies of the REST API (pydantic; unknown request keys refused).

Requests bound every number and every string, so nothing a client sends reaches the
database unchecked: ids are 1..2^31-1, names 1-96 printable characters, lists at most
``MAX_LIST`` items.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from fleet_server.storage.schema import ID_LENGTH, TEXT_LENGTH

MAX_LIST = 1000
MAX_PAUSE_S = 7 * 24 * 3600.0

# No control characters (PostgreSQL refuses NUL in text; none belongs in a name).
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]+$"
# The rule of edge_agent.protocol.topics.validate_device_id.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
RELEASE_KEY_LENGTH = 200

Name = Annotated[str, StringConstraints(min_length=1, max_length=TEXT_LENGTH, pattern=TEXT_PATTERN)]
ReleaseKey = Annotated[
    str, StringConstraints(min_length=1, max_length=RELEASE_KEY_LENGTH, pattern=TEXT_PATTERN)
]
DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN, max_length=ID_LENGTH)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Page(BaseModel):
    total: int
    limit: int
    offset: int


# Devices and groups


class DeviceOut(BaseModel):
    id: str
    group: str | None = Field(description="The production line the device reports.")
    site: str | None
    profile: str | None
    model: str | None = Field(description="name@version of the active model.")
    previous_model: str | None
    edge_version: str | None
    status: str = Field(description="online | offline | unknown")
    drift: list[str]
    spool_queued: int | None
    spool_dropped: int | None
    first_seen: datetime
    last_seen: datetime


class DevicePage(Page):
    items: list[DeviceOut]


class UpdateEventOut(BaseModel):
    id: int
    event: str
    ts: float = Field(description="The device's clock, unix seconds.")
    received_at: datetime
    target: str | None
    model: str | None = Field(description="name@version of the target, when released.")
    sha256: str | None
    percent: int | None
    reason: str | None
    detail: str | None
    figures: dict[str, float]


class ModelChange(BaseModel):
    at: datetime
    event: str = Field(description="activated | rolled_back")
    target: str | None
    model: str | None


class DeviceDetail(DeviceOut):
    model_history: list[ModelChange] = Field(description="Model switches, oldest first.")
    events: list[UpdateEventOut] = Field(description="The latest update events, newest first.")


class DevicePatch(Request):
    """Operator-set fields; send at least one. ``null`` clears ``site``."""

    site: Name | None = None
    line: Name | None = None

    @model_validator(mode="after")
    def _something(self) -> DevicePatch:
        if not self.model_fields_set:
            raise ValueError("send at least one of: site, line")
        if "line" in self.model_fields_set and self.line is None:
            raise ValueError("line cannot be cleared (the device reports it)")
        return self


class GroupOut(BaseModel):
    name: str
    devices: int
    online: int
    offline: int
    models: dict[str, int] = Field(description="Devices per active model (name@version).")
    sites: list[str]


# Registry and rollouts


class Document(BaseModel):
    """A response copied from a service's ``document()``: fields listed here are
    guaranteed, any others are passed through."""

    model_config = ConfigDict(extra="allow")


class ReleaseOut(Document):
    id: int
    target_path: str = Field(description="models/<name>-<version>.tar")
    name: str
    version: str
    model: str = Field(description="name@version")
    runtime: str
    profiles: list[str] = Field(description="Firmware profiles the release is signed for.")
    size: int
    sha256: str
    release_counter: int
    model_card: dict[str, Any]
    released_at: str
    running_on: int = Field(description="Devices reporting this model now.")


class ModelOut(BaseModel):
    name: str
    releases: list[ReleaseOut] = Field(description="Releases, newest counter first.")
    devices: dict[str, int] = Field(description="Devices running each version.")


class SyncOut(BaseModel):
    added: int = Field(description="Releases new to the registry.")


class TargetIn(Request):
    """Devices a rollout may reach: those matching every non-empty list (empty: any)."""

    groups: list[Name] = Field(default_factory=list, max_length=MAX_LIST)
    sites: list[Name] = Field(default_factory=list, max_length=MAX_LIST)
    profiles: list[Name] = Field(default_factory=list, max_length=MAX_LIST)
    devices: list[DeviceId] = Field(default_factory=list, max_length=MAX_LIST)


class WaveIn(Request):
    """One wave: a number of devices or a percentage of the targeted devices."""

    devices: int | None = Field(default=None, ge=1, le=1_000_000)
    percent: float | None = Field(default=None, gt=0, le=100)

    @model_validator(mode="after")
    def _one(self) -> WaveIn:
        if (self.devices is None) == (self.percent is None):
            raise ValueError("a wave needs exactly one of 'devices' or 'percent'")
        return self


class GatesIn(Request):
    """Gate limits of every wave; omitted ones keep the server's defaults."""

    min_activated_fraction: float | None = Field(default=None, ge=0, le=1)
    min_gate_pass_rate: float | None = Field(default=None, ge=0, le=1)
    min_agreement: float | None = Field(default=None, ge=0, le=1)
    max_p99_latency_ms: float | None = Field(default=None, gt=0, le=1e6)
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    max_fail_rate_change: float | None = Field(default=None, ge=0, le=1)
    max_new_drift_alerts: int | None = Field(default=None, ge=0, le=1_000_000)
    observe_s: float | None = Field(default=None, ge=0, le=MAX_PAUSE_S)
    min_frames: int | None = Field(default=None, ge=0, le=10**9)
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_PAUSE_S)


class SkippedOut(BaseModel):
    device_id: str
    reason: str


class PreviewOut(Document):
    release: str = Field(description="The release's target path.")
    model: str
    targeted: list[str] = Field(description="Device ids in wave order.")
    skipped: list[SkippedOut]


class WaveOut(Document):
    number: int
    size: int
    state: str
    gate_results: dict[str, dict[str, Any]] = Field(
        description='Gate name -> {"value", "limit", "passed", "detail"}.'
    )
    started_at: str | None
    finished_at: str | None
    counts: dict[str, int] = Field(description="The wave's devices per status.")


class RolloutDeviceOut(Document):
    device_id: str
    wave: int | None = Field(description="None: skipped (see reason).")
    status: str
    reason: str | None
    assigned_at: str | None
    activated_at: str | None


class RolloutOut(Document):
    id: int
    release: str
    model: str
    state: str = Field(
        description="pending | running | paused | halted | completed | aborted | rolled_back"
    )
    target: dict[str, Any]
    plan: list[dict[str, Any]]
    gates: dict[str, Any]
    pause_s: float
    auto_rollback: bool
    current_wave: int
    reason: str | None
    created_by: str
    created_at: str
    updated_at: str
    waves: list[WaveOut]
    devices: list[RolloutDeviceOut]


class PreviewIn(Request):
    release: ReleaseKey = Field(description="The release: name@version or its target path.")
    target: TargetIn = Field(default_factory=TargetIn)


class RolloutIn(PreviewIn):
    waves: list[WaveIn] = Field(min_length=1, max_length=20)
    gates: GatesIn = Field(default_factory=GatesIn)
    pause_s: float = Field(default=0.0, ge=0, le=MAX_PAUSE_S)
    auto_rollback: bool = False


# Alerts, telemetry, overview, audit


class AlertOut(BaseModel):
    id: int
    scope: str
    scope_key: str
    feature: str
    direction: str
    test: str
    effect: float | None
    statistic: float
    threshold: float
    p_value: float | None
    since: dict[str, Any]
    devices: list[str]
    opened_at: str
    resolved_at: str | None
    superseded_by: int | None
    evidence: dict[str, Any]


class AlertPage(Page):
    items: list[AlertOut]


class WindowPoint(BaseModel):
    """One window as chart data (``fleet_server.storage.window_summary.summarize_window``)."""

    seq: int | None
    t0: int | None
    t1: int | None
    model: str | None
    frames: int = Field(description="Inspected frames: pass + fail + uncertain + error.")
    counts: dict[str, int] = Field(description="Per verdict, dropped frames included.")
    rates: dict[str, float | None] = Field(description="Each outcome's share of frames.")
    throughput: float = Field(description="Frames per second over t0..t1.")
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    means: dict[str, float | None] = Field(description="Feature means over the window.")


class DeviceTelemetry(BaseModel):
    device: str
    windows: list[WindowPoint] = Field(description="Oldest first.")


class Summary(BaseModel):
    windows: int
    frames: int
    counts: dict[str, int]
    rates: dict[str, float | None]
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    means: dict[str, float | None] = Field(description="Frame-weighted feature means.")


class DeviceSummary(Summary):
    device: str


class GroupTelemetry(BaseModel):
    group: str
    since: datetime
    truncated: bool = Field(description="More windows matched than were read.")
    total: Summary
    devices: list[DeviceSummary]


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]


# Operators and tokens


class OperatorIn(Request):
    username: Name
    password: str = Field(min_length=8, max_length=1024)
    role: str = Field(pattern="^(viewer|operator|admin)$")


class TokenOut(BaseModel):
    name: str
    kind: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class OperatorOut(BaseModel):
    id: int
    username: str
    role: str
    disabled: bool
    created_at: datetime
    tokens: list[TokenOut] = Field(description="API tokens (sessions are not listed).")


class TokenIn(Request):
    name: Name
    ttl_s: float | None = Field(default=None, gt=0, le=10 * 365 * 24 * 3600.0)


class IssuedToken(BaseModel):
    username: str
    name: str
    token: str = Field(description="Shown once; the server keeps only its hash.")
