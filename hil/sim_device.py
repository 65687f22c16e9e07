"""One simulated device of the fleet simulation: the agent's real update client, no line.

`SimDevice` wires what the agent wires (``edge_agent/service.py``): one MQTT connection
per device with the retained state (`StatePublisher`) and its offline last will;
`TrustClient` over `MqttFetcher` (python-tuf's full metadata verification plus the
director/release two-role check and the device's profile, runtime and release-counter
checks); `BundleDownloader` (chunk requests in a window, the chunk bitmap, the length and
sha256 check against the signed target); and the update events on
``devices/{id}/events``.

What it leaves out, on purpose: there is no camera, no inference and no slot store. A
verified bundle is deleted instead of being unpacked, and no health gate runs: the device
reports ``gate_passed`` with fixed figures (`SIM_GATE_FIGURES`, agreement 1.0) and then
``activated``, and its retained state names the new model. Telemetry windows are
synthetic (fixed shapes, a little noise) but go through the real `encode_window`, so they
obey the privacy contract. The refusals are the real ones: a release the device's
profile or runtime cannot run, a served file whose bytes differ from the signed hash, bad
metadata.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from edge_agent import __version__ as EDGE_VERSION
from edge_agent.protocol import topics
from edge_agent.protocol.events import EventKind, encode_event
from edge_agent.protocol.notify import NotifyError, decode_notify
from edge_agent.protocol.telemetry import (
    LATENCY_EDGES_MS,
    Moments,
    TelemetryWindow,
    edges_id,
    encode_window,
)
from edge_agent.telemetry.presence import StatePublisher, will_of
from edge_agent.transport import Delivery, Handler, MqttTransport
from edge_agent.update.download import BundleDownloader
from edge_agent.update.errors import Reason, TransferError, TrustError, UpdateError
from edge_agent.update.manager import update_event
from edge_agent.update.mqtt_fetcher import MqttFetcher
from edge_agent.update.state import StateFile
from edge_agent.update.trust import DeviceFacts, Release, TrustClient

log = logging.getLogger("hil.fleet_sim")

# Fixed, not measured: the simulation runs no model (see the module docstring).
SIM_GATE_FIGURES = {
    "agreement": 1.0,
    "frames": 300.0,
    "p99_latency_ms": 8.0,
    "rss_mb": 120.0,
    "nan_frames": 0.0,
    "skipped": 0.0,
    "golden_max_error": 0.0,
}
RETRYABLE = frozenset({Reason.TRANSPORT, Reason.TOO_SLOW})
WINDOW_FRAMES = 600
_SIM_REF = edges_id({"brightness": [float(v) for v in range(0, 256, 8)]})


class Outcome(StrEnum):
    """What one check of a device ended with."""

    UNCHANGED = "unchanged"  # nothing assigned, or the assigned bundle is already active
    ACTIVATED = "activated"
    REFUSED = "refused"
    FAILED = "failed"  # retryable: the server did not answer in time


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """Who a simulated device is: id, firmware profile, runtimes, line, factory model."""

    device_id: str
    profile: str
    runtimes: frozenset[str]
    line: str
    model: str  # "name@version" it runs at start


@dataclass(frozen=True, slots=True)
class DeviceOptions:
    """Transfer settings of every simulated device (the agent's defaults unless noted).

    ``window`` is smaller than the agent's 32: a thousand devices share one loopback
    server, and fewer chunks in flight per device keep answers inside the timeout.
    """

    window: int = 8
    chunk_timeout_s: float = 5.0
    chunk_retries: int = 5
    metadata_timeout_s: float = 5.0
    metadata_retries: int = 3
    min_bytes_per_s: float = 16 * 1024
    min_deadline_s: float = 60.0
    max_bundle_bytes: int = 200 * 1024 * 1024
    keepalive_s: int = 60


class Counters:
    """Counters shared by every device of one worker process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: Counter[str] = Counter()

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class CountingTransport(MqttTransport):
    """`MqttTransport` that counts the topic and payload bytes it publishes and receives
    (MQTT fixed headers and packet ids are not counted)."""

    def __init__(
        self,
        counters: Counters,
        *,
        host: str,
        port: int,
        client_id: str,
        keepalive: int,
        will: tuple[str, bytes, bool],
        reconnect_min_s: float,
        logger: logging.Logger,
    ) -> None:
        super().__init__(
            host=host,
            port=port,
            client_id=client_id,
            keepalive=keepalive,
            will=will,
            reconnect_min_s=reconnect_min_s,
            logger=logger,
        )
        self._counters = counters

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        self._counters.add("bytes_out", len(topic) + len(payload))
        return super().publish(topic, payload, qos, retain)

    def publish_tracked(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> Delivery | None:
        self._counters.add("bytes_out", len(topic) + len(payload))
        return super().publish_tracked(topic, payload, retain=retain)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        counters = self._counters
        answers = topic_filter.endswith("/data")

        def counted(topic: str, payload: bytes) -> None:
            counters.add("bytes_in", len(topic) + len(payload))
            if answers:
                counters.add("answer_bytes", len(payload))
            handler(topic, payload)

        super().subscribe(topic_filter, counted, qos)


class SimDevice:
    """A device's MQTT connection, trust state and update check, without the line.

    Args:
        spec: who the device is.
        home: its private directory (trust metadata, update state, downloads).
        root_json: the root metadata pinned at provisioning.
        broker: ``(host, port)`` of the MQTT broker.
        options: transfer settings.
        counters: the worker's shared counters.

    Raises:
        ValueError: an invalid device id.
    """

    def __init__(
        self,
        spec: DeviceSpec,
        home: Path,
        *,
        root_json: bytes,
        broker: tuple[str, int],
        options: DeviceOptions,
        counters: Counters,
    ) -> None:
        self.spec = spec
        self.options = options
        self._counters = counters
        device_id = topics.validate_device_id(spec.device_id)
        self.transport = CountingTransport(
            counters,
            host=broker[0],
            port=broker[1],
            client_id=device_id,
            keepalive=options.keepalive_s,
            will=will_of(device_id),
            # Many clients reconnecting at once after a broker hiccup: spread them.
            reconnect_min_s=1.0 + random.random(),
            logger=log,
        )
        self.state = StatePublisher(
            self.transport,
            device_id,
            edge=EDGE_VERSION,
            profile=spec.profile,
            line=spec.line,
            spool_counts=lambda: None,
            min_interval_s=0.0,
        )
        self.state.set_model(spec.model)
        self.transport.add_connect_hook(self.state.on_connect)
        self.trust = TrustClient(
            home / "trust",
            root_json,
            MqttFetcher(
                self.transport,
                device_id,
                request_timeout_s=options.metadata_timeout_s,
                retries=options.metadata_retries,
                logger=log,
            ),
            DeviceFacts(device_id, spec.profile, spec.runtimes),
        )
        self.downloader = BundleDownloader(
            self.transport,
            device_id,
            home / "downloads",
            window=options.window,
            request_timeout_s=options.chunk_timeout_s,
            retries=options.chunk_retries,
            min_bytes_per_s=options.min_bytes_per_s,
            min_deadline_s=options.min_deadline_s,
            logger=log,
        )
        self.update_state = StateFile(home / "state.json")
        self.model = spec.model
        self.active_sha256: str | None = None
        self._last_refusal: tuple[str, Reason] | None = None
        self._seq = 0
        self._rng = random.Random(device_id)

    @property
    def device_id(self) -> str:
        return self.spec.device_id

    def start(self, on_notify: Handler) -> None:
        """Connect (in the background) and hand every ``notify`` to ``on_notify``."""
        self.transport.subscribe(topics.NOTIFY, on_notify, qos=1)
        self.transport.start()

    def stop(self) -> None:
        """Publish the offline state (best effort), then disconnect cleanly."""
        self.state.publish_offline(0.0)
        self.transport.stop()

    def wants_check(self, payload: bytes) -> bool:
        """True if a ``notify`` announces a timestamp newer than the trusted one."""
        try:
            announced = decode_notify(payload)
        except NotifyError as e:
            log.debug("%s: ignoring malformed notify: %s", self.device_id, e)
            return False
        return announced > self.trust.trusted_timestamp_version()

    # -- one check, as UpdateManager.run_once does it, minus unpack and gate -------------

    def check(self) -> Outcome:
        """Refresh trusted metadata; download and "activate" the assigned bundle if new.

        Refusals and transfer failures are reported as events and returned, never raised.
        """
        release: Release | None = None
        try:
            now = self.update_state.trusted_now()
            release = self.trust.check(
                now,
                dict(self.update_state.state.counters),
                dict(self.update_state.state.blocklist),
                commit=False,
            )
            if release is None or release.sha256 == self.active_sha256:
                self.trust.commit()
                return Outcome.UNCHANGED
            if release.length > self.options.max_bundle_bytes:
                raise TrustError(
                    Reason.INCOMPATIBLE,
                    f"{release.path} is {release.length} bytes, over the device's "
                    f"{self.options.max_bundle_bytes}",
                )
            self._install(release)
        except UpdateError as e:
            self.trust.discard()
            return self._report_failure(e, release)
        except BaseException:
            self.trust.discard()
            raise
        return Outcome.ACTIVATED

    def _install(self, release: Release) -> None:
        last = [-1]

        def progress(received: int, total: int) -> None:
            percent = int(100 * received / total) if total else 100
            if percent >= last[0] + 10 or received == total:
                last[0] = percent
                self._emit(EventKind.DOWNLOADING, release, percent=percent)

        self._emit(EventKind.DOWNLOADING, release, percent=0)
        self.downloader.download(release.path, release.length, release.sha256, progress=progress)
        self._counters.add("bundle_bytes", self.downloader.stats.bytes_received)
        self._counters.add("chunk_retries", self.downloader.stats.retries)
        self._emit(EventKind.VERIFIED, release)
        # Not unpacked: the simulation has no slots and runs no model.
        self.downloader.discard(release.sha256)
        self._emit(EventKind.GATE_PASSED, release, figures=dict(SIM_GATE_FIGURES))
        self.trust.commit()
        self.update_state.raise_counter(release.model, release.counter)
        self.active_sha256 = release.sha256
        self.model = f"{release.model}@{release.version}"
        self._last_refusal = None
        self._emit(
            EventKind.ACTIVATED,
            release,
            detail=f"{release.model} {release.version} active (simulated device)",
        )
        self.state.set_model(self.model)
        self.state.tick()

    def _report_failure(self, error: UpdateError, release: Release | None) -> Outcome:
        target = release.path if release is not None else None
        sha256 = release.sha256 if release is not None else None
        self._counters.add(f"reason.{error.reason.value}")
        if error.reason in RETRYABLE:
            # The partial download stays: the retry resumes it from the bitmap.
            self._emit(
                EventKind.FAILED,
                target=target,
                sha256=sha256,
                reason=error.reason.value,
                detail=error.message,
            )
            return Outcome.FAILED
        if isinstance(error, TransferError) and release is not None:
            self.downloader.discard(release.sha256)
        key = (sha256 or "", error.reason)
        if key != self._last_refusal:  # the same refusal again is not reported again
            self._last_refusal = key
            self._emit(
                EventKind.REFUSED,
                target=target,
                sha256=sha256,
                reason=error.reason.value,
                detail=error.message,
            )
        return Outcome.REFUSED

    def _emit(
        self,
        kind: EventKind,
        release: Release | None = None,
        *,
        target: str | None = None,
        sha256: str | None = None,
        percent: int | None = None,
        reason: str | None = None,
        detail: str | None = None,
        figures: dict[str, float] | None = None,
    ) -> None:
        event = update_event(
            kind,
            release,
            target=target,
            sha256=sha256,
            percent=percent,
            reason=reason,
            detail=detail,
            figures=figures,
        )
        self._counters.add(f"event.{kind.value}")
        if not self.transport.publish(topics.events(self.device_id), encode_event(event), qos=1):
            self._counters.add("events_not_queued")

    # -- telemetry -----------------------------------------------------------------------

    def publish_window(self, t1: int, span_s: int) -> bool:
        """Publish one synthetic aggregate window ending at ``t1``; False if not queued."""
        self._seq += 1
        payload = encode_window(synthetic_window(self._seq, t1 - span_s, t1, self.model, self._rng))
        queued = self.transport.publish(topics.telemetry(self.device_id), payload, qos=1)
        self._counters.add("windows_sent" if queued else "windows_not_queued")
        return queued


def synthetic_window(seq: int, t0: int, t1: int, model: str, rng: random.Random) -> TelemetryWindow:
    """A plausible window of `WINDOW_FRAMES` frames: verdict counts, brightness moments and
    a latency histogram, with a little noise; it passes the privacy checks."""
    fail = rng.randint(5, 20)
    uncertain = rng.randint(0, 5)
    passed = WINDOW_FRAMES - fail - uncertain
    mean = 120.0 + rng.gauss(0.0, 2.0)
    sd = 6.0
    total = mean * WINDOW_FRAMES
    total_sq = WINDOW_FRAMES * (sd * sd + mean * mean)
    bins = len(LATENCY_EDGES_MS) + 1
    latency = [0] * bins
    # Most frames between 5 and 15 ms: bins 4..6 (bounds 5, 7.5, 10, 15).
    latency[4] = WINDOW_FRAMES // 2
    latency[5] = WINDOW_FRAMES // 3
    latency[6] = WINDOW_FRAMES - latency[4] - latency[5]
    return TelemetryWindow(
        seq=seq,
        t0=t0,
        t1=t1,
        model=model,
        edge=EDGE_VERSION,
        ref=_SIM_REF,
        counts={"pass": passed, "fail": fail, "uncertain": uncertain, "error": 0, "dropped": 0},
        moments={"brightness": Moments(WINDOW_FRAMES, total, total_sq)},
        latency=latency,
    )
