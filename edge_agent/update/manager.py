"""The device's update loop: check, download, stage, gate, switch, report; never stops the line.

One thread does the whole sequence for the bundle the director assigns to this device::

    trusted time -> TUF refresh + two-role check (trust.py) -> resumable download
    (download.py) -> unpack into the idle slot (slots.py) -> health gate on live frames
    (gate.py) -> atomic slot switch -> hot swap in the running pipeline -> events

The line's own loop only hands each inspected frame to ``offer`` (a non-blocking put while
a gate runs). Every step reports on ``devices/{id}/events``; every refusal has a typed
`Reason`. A crash during the gate is counted in the state file before the gate starts, so
``recover`` (at start) ends a crash loop by blocklisting the candidate and reporting the
rollback: the old slot, still active, keeps serving.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.core.frame import Frame
from edge_agent.core.verdict import Verdict
from edge_agent.inspect import Inspector
from edge_agent.protocol import topics
from edge_agent.protocol.errors import BundleError
from edge_agent.protocol.events import EventKind, UpdateEvent, encode_event
from edge_agent.protocol.notify import NotifyError, decode_notify
from edge_agent.runtimes import ModelLoadError
from edge_agent.transport import MqttTransport
from edge_agent.update.download import BundleDownloader
from edge_agent.update.errors import (
    GateError,
    InstallError,
    Reason,
    TransferError,
    TrustError,
    UpdateError,
)
from edge_agent.update.gate import GateLimits, GateReport, ShadowRun, check_golden
from edge_agent.update.slots import ReleaseInfo, SlotInfo, SlotStore
from edge_agent.update.state import StateFile
from edge_agent.update.trust import Release, TrustClient

log = logging.getLogger("edge_agent.update")

# Reasons after which the same bundle may succeed later: keep the partial download.
RETRYABLE = frozenset({Reason.TRANSPORT, Reason.TOO_SLOW, Reason.GATE_TIMEOUT})


@dataclass(frozen=True, slots=True)
class UpdateSettings:
    gate: GateLimits
    poll_interval_s: float = 300.0
    max_attempts: int = 3
    max_bundle_bytes: int = 200 * 1024 * 1024


class UpdateManager:
    """Runs updates in the background for one device.

    Args:
        transport: the device's MQTT connection (events, notify).
        device_id: this device.
        trust: the TUF + Uptane client.
        downloader: resumable bundle transfer.
        slots: the A/B slot store the running model came from.
        state: counters, blocklist, pending attempts, trusted time.
        open_model: opens a staged bundle directory the way the line opens its model
            (runtime options, threshold overrides); raises on an unusable bundle.
        swap: puts a gated, warmed inspector into the running pipeline.
        settings: limits and timings.
    """

    def __init__(
        self,
        *,
        transport: MqttTransport,
        device_id: str,
        trust: TrustClient,
        downloader: BundleDownloader,
        slots: SlotStore,
        state: StateFile,
        open_model: Callable[[Path], Inspector],
        swap: Callable[[Inspector], None],
        settings: UpdateSettings,
    ) -> None:
        self._transport = transport
        self.device_id = topics.validate_device_id(device_id)
        self.trust = trust
        self.downloader = downloader
        self.slots = slots
        self.state = state
        self._open_model = open_model
        self._swap = swap
        self.settings = settings
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._shadow: ShadowRun | None = None
        self._last_refusal: tuple[str, Reason] | None = None
        self.events: list[UpdateEvent] = []  # what was reported, newest last (bounded)

    # -- the line's side ------------------------------------------------------------------

    def offer(self, frame: Frame, verdict: Verdict) -> None:
        """Hand an inspected frame to a running health gate; never blocks."""
        shadow = self._shadow
        if shadow is not None:
            shadow.offer(frame, verdict)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, *, check_now: bool = True) -> None:
        """Finish or roll back what a crash interrupted, then check in the background:
        at once (unless ``check_now`` is False), on each notify, and every poll interval."""
        self.recover()
        if check_now:
            self._wake.set()
        self._transport.subscribe(topics.NOTIFY, self._on_notify, qos=1)
        self._thread = threading.Thread(target=self._loop, name="update", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        shadow = self._shadow
        if shadow is not None:
            shadow.close()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def trigger(self) -> None:
        """Check for an update now (as a ``notify`` does)."""
        self._wake.set()

    def _on_notify(self, _topic: str, payload: bytes) -> None:
        # Only a wake-up, and an unsigned one: what to install is decided by verified
        # metadata alone. An old retained notify replayed by the broker (a version the
        # device already trusts) does not even cause a check.
        try:
            announced = decode_notify(payload)
        except NotifyError as e:
            log.debug("ignoring malformed notify: %s", e)
            return
        if announced > self.trust.trusted_timestamp_version():
            self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(timeout=self.settings.poll_interval_s)
            self._wake.clear()
            if self._stopping.is_set():
                return
            self.run_once()

    def recover(self) -> None:
        """Settle a pending candidate left by a crash (called once at start)."""
        pending = self.state.state.pending
        if pending is None:
            return
        active = self.slots.active()
        if active is not None and active.sha256 == pending.sha256:
            # Switched, then died before the bookkeeping: the switch stands.
            self._finish_activation(active)
            return
        if pending.attempts >= self.settings.max_attempts:
            detail = f"the agent died {pending.attempts} times during the health gate"
            self.state.block(pending.sha256, Reason.GATE_CRASHED.value)
            self.state.clear_pending()
            self._emit(
                EventKind.ROLLED_BACK,
                target=pending.target,
                sha256=pending.sha256,
                reason=Reason.GATE_CRASHED.value,
                detail=detail + "; the previous model stays active",
            )

    # -- one update -----------------------------------------------------------------------

    def run_once(self) -> Release | None:
        """One check-and-install pass. Returns the release now active if it changed.

        The verified metadata becomes the trusted set only if the pass ends well (the
        update is active, or there was nothing to do); any refusal leaves the trust state
        as it was.
        """
        release: Release | None = None
        try:
            now = self.state.trusted_now()
            release = self.trust.check(
                now,
                dict(self.state.state.counters),
                dict(self.state.state.blocklist),
                commit=False,
            )
            active = self.slots.active()
            if release is None or (active is not None and active.sha256 == release.sha256):
                self.trust.commit()
                return None
            if release.length > self.settings.max_bundle_bytes:
                raise TrustError(
                    Reason.INCOMPATIBLE,
                    f"{release.path} is {release.length} bytes, over the device's "
                    f"{self.settings.max_bundle_bytes}",
                )
            self._install(release)
        except UpdateError as e:
            self.trust.discard()
            self._report_failure(e, release)
            return None
        except BaseException:
            self.trust.discard()
            raise
        return release

    def _install(self, release: Release) -> None:
        last = [-1]

        def progress(received: int, total: int) -> None:
            percent = int(100 * received / total) if total else 100
            if percent >= last[0] + 10 or received == total:
                last[0] = percent
                self._emit(EventKind.DOWNLOADING, release, percent=percent)

        self._emit(EventKind.DOWNLOADING, release, percent=0)
        tar_path = self.downloader.download(
            release.path, release.length, release.sha256, progress=progress
        )
        self._emit(EventKind.VERIFIED, release)
        try:
            staged = self.slots.stage(
                tar_path, ReleaseInfo(release.path, release.sha256, release.counter)
            )
        finally:
            self.downloader.discard(release.sha256)
        self._emit(EventKind.STAGED, release, detail=f"slot {staged.slot}")
        attempts = self.state.begin_attempt(release.sha256, release.path)
        self._emit(EventKind.GATE_STARTED, release, figures={"attempt": float(attempts)})
        candidate = self._gate(release, staged.path)
        self.trust.commit()
        self.slots.activate(staged.slot)
        self._swap(candidate)
        active = self.slots.active()
        if active is None:  # activate() has just written it
            raise RuntimeError("slot pointer missing right after the switch")
        self._finish_activation(active)

    def _gate(self, release: Release, slot_dir: Path) -> Inspector:
        """Load, golden samples, shadow run; the passing candidate comes back warmed up.

        Raises:
            GateError: the gate failed (already reported with its figures and blocklisted,
                unless the reason is retryable).
        """
        report: GateReport | None = None
        golden_error = math.nan
        try:
            try:
                candidate = self._open_model(slot_dir)
            except (BundleError, ModelLoadError, OSError, ValueError, RuntimeError) as e:
                raise GateError(Reason.GATE_LOAD, f"candidate does not load: {e}") from e
            try:
                golden_error = check_golden(candidate)
                shadow = ShadowRun(candidate, self.settings.gate, golden_max_error=golden_error)
                self._shadow = shadow
                try:
                    report = shadow.wait(self.settings.gate.timeout_s)
                finally:
                    self._shadow = None
                    report = shadow.close() if report is None else report
                if not report.passed:
                    raise GateError(report.reason or Reason.GATE_AGREEMENT, report.message)
            except BaseException:
                candidate.close()
                raise
        except GateError as e:
            figures = gate_figures(report, golden_error)
            if e.reason not in RETRYABLE:
                self.state.block(release.sha256, e.reason.value)
            self.state.clear_pending()
            self._emit(
                EventKind.GATE_FAILED,
                release,
                reason=e.reason.value,
                detail=e.message,
                figures=figures,
            )
            e.reported = True
            raise
        self._emit(EventKind.GATE_PASSED, release, figures=gate_figures(report, golden_error))
        return candidate

    def _finish_activation(self, active: SlotInfo) -> None:
        self.state.raise_counter(active.model_name, active.release_counter)
        self.state.clear_pending()
        self._emit(
            EventKind.ACTIVATED,
            target=active.target_path,
            sha256=active.sha256,
            detail=f"{active.model_name} {active.model_version} active in slot {active.slot}",
        )

    def _report_failure(self, error: UpdateError, release: Release | None) -> None:
        if error.reported:
            return
        target = release.path if release is not None else None
        sha256 = release.sha256 if release is not None else None
        if error.reason in RETRYABLE:
            # The partial download stays; the next check resumes it.
            self._emit(
                EventKind.FAILED,
                target=target,
                sha256=sha256,
                reason=error.reason.value,
                detail=error.message,
            )
            return
        if isinstance(error, TransferError) and release is not None:
            self.downloader.discard(release.sha256)
        if isinstance(error, InstallError) and release is not None:
            # A release-signed archive that does not unpack into a valid bundle will
            # never do so: do not fetch it again.
            self.state.block(release.sha256, error.reason.value)
        key = (sha256 or "", error.reason)
        if key == self._last_refusal:
            return  # the same refusal on every poll would flood the events topic
        self._last_refusal = key
        self._emit(
            EventKind.REFUSED,
            target=target,
            sha256=sha256,
            reason=error.reason.value,
            detail=error.message,
        )

    # -- events ---------------------------------------------------------------------------

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
        self.events.append(event)
        del self.events[:-256]
        level = (
            logging.WARNING
            if kind in (EventKind.REFUSED, EventKind.GATE_FAILED)
            else (logging.INFO)
        )
        log.log(
            level,
            f"update {kind.value}",
            extra={
                "event": f"update_{kind.value}",
                "target": event.target,
                "reason": reason,
                "detail": detail,
                "percent": percent,
                **({"figures": figures} if figures else {}),
            },
        )
        self._transport.publish(topics.events(self.device_id), encode_event(event), qos=1)


def update_event(
    kind: EventKind,
    release: Release | None = None,
    *,
    target: str | None = None,
    sha256: str | None = None,
    percent: int | None = None,
    reason: str | None = None,
    detail: str | None = None,
    figures: dict[str, float] | None = None,
) -> UpdateEvent:
    """The event of ``kind``, now; a ``release`` names the target and hash."""
    return UpdateEvent(
        event=kind,
        ts=time.time(),
        target=release.path if release is not None else target,
        sha256=release.sha256 if release is not None else sha256,
        percent=percent,
        reason=reason,
        detail=detail,
        figures=figures or {},
    )


def gate_figures(report: GateReport | None, golden_error: float) -> dict[str, float]:
    """The gate's measured numbers (those that were measured), for the gate events."""
    figures = {"golden_max_error": golden_error}
    if report is not None:
        figures |= {
            "frames": float(report.frames),
            "agreement": report.agreement,
            "p99_latency_ms": report.p99_latency_ms,
            "rss_mb": report.rss_mb,
            "nan_frames": float(report.nan_frames),
            "skipped": float(report.skipped),
        }
    return {name: value for name, value in figures.items() if math.isfinite(value)}
