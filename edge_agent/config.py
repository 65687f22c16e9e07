"""Agent configuration (one TOML file) and firmware profiles.

Config enters once: ``service.py`` calls ``load_config`` and hands plain values to the
libraries. Unknown keys are errors everywhere, and every error names the file and the
key (``agent.toml: [source] unknown key 'ulr'``). Relative paths in the file are
resolved against the file's directory.

A firmware profile (``firmware_profiles/NAME.toml``) describes a device class: which
runtime and execution providers to prefer, thread counts, memory budget, evidence quota
and camera defaults. Profile values are defaults that the agent config may override.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 devices only
    import tomli as tomllib

DEFAULT_CONFIG = Path("/etc/edge-agent/agent.toml")
SOURCE_SCHEMES = ("camera", "folder", "replay", "synthetic")
# A source checkout keeps them beside the package; an installed wheel under its prefix.
_PACKAGE_PROFILES = Path(__file__).resolve().parent.parent / "firmware_profiles"
_INSTALLED_PROFILES = Path(sys.prefix) / "share" / "edgefleet" / "firmware_profiles"


class ConfigError(Exception):
    """The config or a profile is invalid; the message names the file and every bad key."""


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` as (host, port). Raises ValueError naming the text."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port, got {text!r}")
    return host, int(port)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- firmware profiles ------------------------------------------------------------------


class ProfileEvidence(_Strict):
    quota_mb: Annotated[int, Field(ge=0)]


class ProfileCamera(_Strict):
    width: Annotated[int, Field(ge=16)]
    height: Annotated[int, Field(ge=16)]
    fps: Annotated[float, Field(gt=0)]
    fourcc: Annotated[str, Field(min_length=4, max_length=4)] = "MJPG"


class FirmwareProfile(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")]
    description: str = ""
    arch: Literal["aarch64", "armv7l", "x86_64"]
    cores: Annotated[int, Field(ge=1)]
    memory_mb: Annotated[int, Field(ge=64)]
    runtimes: Annotated[list[Literal["onnx", "tflite"]], Field(min_length=1)]
    providers: Annotated[list[str], Field(min_length=1)]
    threads: Annotated[int, Field(ge=1)]
    decode_workers: Annotated[int, Field(ge=1)] = 1
    memory_budget_mb: Annotated[int, Field(ge=16)]
    # p99 inference latency a candidate model must stay under in the update health gate.
    latency_budget_ms: Annotated[float, Field(gt=0)] = 100.0
    evidence: ProfileEvidence
    camera: ProfileCamera


# -- agent config -----------------------------------------------------------------------


class DeviceSection(_Strict):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    profile: str = "x86-generic"
    site: str = ""
    group: str = ""
    # Production line, sent in the retained device state (fleet drift groups by it).
    line: Annotated[str, Field(min_length=1, max_length=96)] | None = None


class SourceSection(_Strict):
    """``url`` picks the source: ``camera:TARGET``, ``folder:DIR``, ``replay:PATH`` or
    ``synthetic:``. The other keys apply to the kinds named in their comments."""

    url: str
    # camera (defaults from the profile's [camera])
    width: Annotated[int, Field(ge=16)] | None = None
    height: Annotated[int, Field(ge=16)] | None = None
    fps: Annotated[float, Field(gt=0)] | None = None
    fourcc: Annotated[str, Field(min_length=4, max_length=4)] | None = None
    # folder
    settle_s: Annotated[float, Field(ge=0)] = 0.5
    # replay
    realtime: bool = False
    loop: bool = False
    # synthetic
    seed: int = 1
    defect_rate: Annotated[float, Field(ge=0, le=1)] = 0.1
    brightness: Annotated[float, Field(gt=0)] = 1.0
    # Lighting drifts linearly from `brightness` to `brightness_end` over `ramp_frames`.
    brightness_end: Annotated[float, Field(gt=0)] | None = None
    ramp_frames: Annotated[int, Field(ge=1)] = 1
    variant: str = "a"
    size: Annotated[str, Field(pattern=r"^[0-9]+x[0-9]+$")] = "1280x960"
    count: Annotated[int, Field(ge=1)] | None = None

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme, sep, target = url.partition(":")
        if not sep or scheme not in SOURCE_SCHEMES:
            raise ValueError(
                f"must start with one of {', '.join(s + ':' for s in SOURCE_SCHEMES)}; got {url!r}"
            )
        if scheme != "synthetic" and not target:
            raise ValueError(f"{scheme}: needs a target, e.g. {scheme}:/path")
        return url

    @property
    def scheme(self) -> str:
        return self.url.partition(":")[0]

    @property
    def target(self) -> str:
        return self.url.partition(":")[2]


class ModelSection(_Strict):
    bundle: Path


class RuntimeSection(_Strict):
    """Defaults come from the firmware profile."""

    threads: Annotated[int, Field(ge=1)] | None = None
    providers: list[str] | None = None
    decode_workers: Annotated[int, Field(ge=1)] | None = None
    queue_size: Annotated[int, Field(ge=1, le=1024)] = 8


class ThresholdsSection(_Strict):
    """Override the bundle's decision thresholds on this device."""

    t_fail: Annotated[float, Field(gt=0, le=1)] | None = None
    t_uncertain: Annotated[float, Field(ge=0, le=1)] | None = None


class StorageSection(_Strict):
    state_dir: Path = Path("/var/lib/edge-agent")
    results_max_age_days: Annotated[float, Field(gt=0)] = 30.0
    results_max_rows: Annotated[int, Field(ge=1000)] = 1_000_000
    evidence_quota_mb: Annotated[int, Field(ge=0)] | None = None  # default: profile
    evidence_pass_every: Annotated[int, Field(ge=0)] = 100
    evidence_jpeg_quality: Annotated[int, Field(ge=10, le=100)] = 90

    @property
    def results_db(self) -> Path:
        return self.state_dir / "results.db"

    @property
    def evidence_dir(self) -> Path:
        return self.state_dir / "evidence"


class FleetSection(_Strict):
    """The fleet broker. With ``broker`` set the agent connects (one MQTT connection) and
    publishes its retained state and, unless ``[telemetry] enabled = false``, telemetry;
    model updates also need ``root_metadata``."""

    broker: str | None = None  # host:port
    root_metadata: Path | None = None  # root.json pinned at provisioning
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    poll_interval_s: Annotated[float, Field(gt=0)] = 300.0
    gate_frames: Annotated[int, Field(ge=1)] = 200
    gate_min_agreement: Annotated[float, Field(ge=0, le=1)] = 0.98
    gate_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    gate_max_attempts: Annotated[int, Field(ge=1)] = 3
    max_bundle_mb: Annotated[int, Field(ge=1)] = 200

    @field_validator("broker")
    @classmethod
    def _host_port(cls, broker: str | None) -> str | None:
        if broker is not None:
            split_host_port(broker)
        return broker

    @model_validator(mode="after")
    def _complete(self) -> FleetSection:
        if self.root_metadata is not None and self.broker is None:
            raise ValueError("root_metadata needs broker (updates come over MQTT)")
        tls = (self.tls_ca, self.tls_cert, self.tls_key)
        if any(tls) and not all(tls):
            raise ValueError("tls_ca, tls_cert and tls_key go together")
        return self

    @property
    def enabled(self) -> bool:
        """A broker is configured: the agent connects to it."""
        return self.broker is not None

    @property
    def updates(self) -> bool:
        """Model updates are on: a broker and a pinned trust root."""
        return self.broker is not None and self.root_metadata is not None

    @property
    def host_port(self) -> tuple[str, int]:
        if self.broker is None:
            raise RuntimeError("fleet updates are off: no broker")
        return split_host_port(self.broker)


class TelemetrySection(_Strict):
    """Aggregate windows (sent through ``[fleet] broker``) and the local drift check."""

    enabled: bool = True
    window_frames: Annotated[int, Field(ge=50)] = 500  # 50: the privacy floor
    window_s: Annotated[float, Field(gt=0)] = 60.0
    check_frames: Annotated[int, Field(ge=50)] = 100  # the local drift check's windows
    spool_max_mb: Annotated[float, Field(gt=0)] = 16.0
    spool_max_windows: Annotated[int, Field(ge=1)] = 10_000
    drift_hold_windows: Annotated[int, Field(ge=1)] = 3
    state_interval_s: Annotated[float, Field(gt=0)] = 5.0

    @property
    def spool_max_bytes(self) -> int:
        return max(4096, int(self.spool_max_mb * 1024 * 1024))


class MqttOutputSection(_Strict):
    """One message per verdict to the plant's own broker (not the fleet connection)."""

    broker: str  # host:port
    topic: str
    qos: Literal[0, 1] = 0
    client_id: str | None = None  # default: "<device id>-verdicts"
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    queue: Annotated[int, Field(ge=1)] = 256

    @field_validator("broker")
    @classmethod
    def _broker(cls, broker: str) -> str:
        split_host_port(broker)
        return broker

    @field_validator("topic")
    @classmethod
    def _topic(cls, topic: str) -> str:
        from edge_agent.sinks.mqtt_verdicts import validate_verdict_topic

        validate_verdict_topic(topic)
        return topic

    @model_validator(mode="after")
    def _tls(self) -> MqttOutputSection:
        tls = (self.tls_ca, self.tls_cert, self.tls_key)
        if any(tls) and not all(tls):
            raise ValueError("tls_ca, tls_cert and tls_key go together")
        return self


class RejectSection(_Strict):
    """The reject signal: a pulse on a GPIO line for each rejected verdict."""

    chip: str  # "/dev/gpiochipN", or "simulated" on a device without GPIO (tests, demos)
    line: int | str  # offset on the chip, or the line's name
    delay_ms: Annotated[float, Field(ge=0)] = 0.0  # capture to pulse: conveyor travel
    pulse_ms: Annotated[float, Field(gt=0)] = 50.0
    outcomes: Annotated[list[Literal["fail", "uncertain", "error"]], Field(min_length=1)] = ["fail"]
    active_low: bool = False
    max_late_ms: Annotated[float, Field(gt=0)] | None = None


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RestSection(_Strict):
    """The local REST API (needs the ``outputs`` and ``server`` extras on the device).

    Off the loopback interface a bearer token is required: ``token_file`` holds it (one
    line, at least 16 characters)."""

    listen: str = "127.0.0.1:8080"  # host:port
    token_file: Path | None = None
    max_image_mb: Annotated[float, Field(gt=0, le=256)] = 16.0
    results_limit: Annotated[int, Field(ge=1, le=100_000)] = 1000

    @field_validator("listen")
    @classmethod
    def _listen(cls, listen: str) -> str:
        split_host_port(listen)
        return listen

    @model_validator(mode="after")
    def _token_off_loopback(self) -> RestSection:
        host, _ = split_host_port(self.listen)
        if self.token_file is None and not is_loopback_host(host):
            raise ValueError(
                f"listen {self.listen!r} is not a loopback address: token_file is required"
            )
        return self


class OpcUaSection(_Strict):
    """An OPC UA server with the latest verdict, counters, model and drift flag."""

    listen: str = "127.0.0.1:4840"  # host:port
    queue: Annotated[int, Field(ge=1)] = 64

    @field_validator("listen")
    @classmethod
    def _listen(cls, listen: str) -> str:
        split_host_port(listen)
        return listen


class OutputsSection(_Strict):
    """Line outputs; each is optional, has its own queue and never slows inspection."""

    mqtt: MqttOutputSection | None = None
    reject: RejectSection | None = None
    rest: RestSection | None = None
    opcua: OpcUaSection | None = None


class MetricsSection(_Strict):
    """Prometheus metrics on their own address (they are also at the REST API's /metrics)."""

    listen: str | None = None  # host:port; unset: only at [outputs.rest]

    @field_validator("listen")
    @classmethod
    def _listen(cls, listen: str | None) -> str | None:
        if listen is not None:
            split_host_port(listen)
        return listen


class LogSection(_Strict):
    format: Literal["auto", "json", "text"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    summary_interval_s: Annotated[float, Field(gt=0)] = 10.0


class AgentConfig(_Strict):
    device: DeviceSection
    source: SourceSection
    model: ModelSection
    runtime: RuntimeSection = RuntimeSection()
    thresholds: ThresholdsSection = ThresholdsSection()
    storage: StorageSection = StorageSection()
    fleet: FleetSection = FleetSection()
    telemetry: TelemetrySection = TelemetrySection()
    outputs: OutputsSection = OutputsSection()
    metrics: MetricsSection = MetricsSection()
    log: LogSection = LogSection()


def load_config(path: Path) -> AgentConfig:
    """Read and validate the agent config at ``path``.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown or invalid keys (all named).
    """
    raw = _read_toml(path)
    base = path.resolve().parent
    relative_paths = (
        ("model", "bundle"),
        ("storage", "state_dir"),
        ("fleet", "root_metadata"),
        ("fleet", "tls_ca"),
        ("fleet", "tls_cert"),
        ("fleet", "tls_key"),
    )
    for section_name, key in relative_paths:
        section = raw.get(section_name)
        if isinstance(section, dict):
            value = section.get(key)
            if isinstance(value, str) and not os.path.isabs(value):
                section[key] = os.path.normpath(base / value)
    outputs = raw.get("outputs")
    rest = outputs.get("rest") if isinstance(outputs, dict) else None
    if isinstance(rest, dict):
        token_file = rest.get("token_file")
        if isinstance(token_file, str) and not os.path.isabs(token_file):
            rest["token_file"] = os.path.normpath(base / token_file)
    source = raw.get("source")
    if isinstance(source, dict) and isinstance(source.get("url"), str):
        scheme, sep, target = source["url"].partition(":")
        if sep and scheme in ("folder", "replay") and target and not os.path.isabs(target):
            source["url"] = f"{scheme}:{os.path.normpath(base / target)}"
    try:
        return AgentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {describe_errors(e)}") from e


def profile_search_path() -> list[Path]:
    """Where profiles are looked up by name, in order."""
    paths = []
    env = os.environ.get("EDGE_AGENT_PROFILES")
    if env:
        paths += [Path(p) for p in env.split(os.pathsep) if p]
    paths += [Path("/etc/edge-agent/profiles"), _INSTALLED_PROFILES, _PACKAGE_PROFILES]
    return paths


def load_profile(name_or_path: str, search: list[Path] | None = None) -> FirmwareProfile:
    """Load a firmware profile by name (searched in ``search``) or by file path.

    Raises:
        ConfigError: not found (lists where it looked), bad TOML or invalid keys.
    """
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or os.sep in name_or_path:
        path = candidate
        if not path.is_file():
            raise ConfigError(f"firmware profile file {path} not found")
    else:
        dirs = search if search is not None else profile_search_path()
        found = [d / f"{name_or_path}.toml" for d in dirs if (d / f"{name_or_path}.toml").is_file()]
        if not found:
            where = ", ".join(str(d) for d in dirs)
            raise ConfigError(f"firmware profile {name_or_path!r} not found in {where}")
        path = found[0]
    raw = _read_toml(path)
    try:
        return FirmwareProfile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {describe_errors(e)}") from e


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            data: dict[str, object] = tomllib.load(f)
            return data
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such file") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def describe_errors(error: ValidationError) -> str:
    """One message naming every bad key as ``[section] key``."""
    parts = []
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        if len(loc) >= 2:
            where = f"[{loc[0]}] {'.'.join(loc[1:])}"
        elif loc:
            where = f"[{loc[0]}]" if item["type"] != "extra_forbidden" else loc[0]
        else:
            where = "(top level)"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown key {where}")
        elif item["type"] == "missing":
            parts.append(f"missing key {where}")
        else:
            msg = str(item["msg"]).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}")
    return "; ".join(parts)
