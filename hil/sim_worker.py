"""One worker process of the fleet simulation: many `SimDevice`s, a few update threads.

`run_worker` is the process's entry point (started by `hil.fleet_sim.FleetSim` with the
``spawn`` method). It connects every device of its share (one MQTT connection each, as
on real devices, where the broker ACL is per device), runs each device's first check at
once (as the agent does at start), and a check whenever a ``notify`` announces metadata
newer than the device trusts. Checks run on ``concurrency`` threads: on two cores a
thousand simultaneous downloads only queue at the server and time out, so the devices
of a process take turns, like a fleet whose agents do not all wake in the same second.
A check that failed for a retryable reason (the server did not answer in time) is tried
again after ``retry_s``. Telemetry windows go out every ``telemetry_interval_s`` per
device (0: none), spread over the interval.

Every ``report_interval_s`` the worker puts a `WorkerReport` on the report queue.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import resource
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

from hil.sim_device import Counters, DeviceOptions, DeviceSpec, Outcome, SimDevice

log = logging.getLogger("hil.fleet_sim")

_CONNECT_SPREAD_S = 0.002  # between two connection attempts: no SYN flood on the broker


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What one worker process simulates (picklable: it crosses the spawn boundary)."""

    index: int
    host: str
    port: int
    devices: tuple[DeviceSpec, ...]
    root_json: bytes
    work_dir: Path
    options: DeviceOptions
    concurrency: int
    telemetry_interval_s: float
    retry_s: float
    report_interval_s: float


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """A worker's counters at one moment (sent to the parent)."""

    index: int
    devices: int
    connected: int
    ready: int  # devices whose first check has finished
    models: dict[str, int]  # model id -> devices running it
    counters: dict[str, int]
    peak_rss_mb: float
    cpu_s: float
    final: bool = False
    error: str | None = None
    outcomes: dict[str, int] = field(default_factory=dict)


class _Slot:
    """Scheduling state of one device: at most one check runs, one more may be due."""

    __slots__ = ("again", "checked", "device", "queued", "running")

    def __init__(self, device: SimDevice) -> None:
        self.device = device
        self.queued = False
        self.running = False
        self.again = False
        self.checked = False


class _Scheduler:
    """Runs device checks on a fixed number of threads; retries after a delay."""

    def __init__(self, concurrency: int, retry_s: float, counters: Counters) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Slot | None] = queue.SimpleQueue()
        self._retries: list[tuple[float, int, _Slot]] = []
        self._retry_ids = itertools.count()
        self._retry_wake = threading.Condition(self._lock)
        self._retry_s = retry_s
        self._counters = counters
        self._stopping = False
        self.outcomes: Counter[str] = Counter()
        self.ready = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"check-{i}", daemon=True)
            for i in range(concurrency)
        ]
        self._threads.append(threading.Thread(target=self._retry_loop, name="retry", daemon=True))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def wake(self, slot: _Slot) -> None:
        """Check `slot`'s device soon; once more after the running check, if one runs."""
        with self._lock:
            if slot.running:
                slot.again = True
            elif not slot.queued:
                slot.queued = True
                self._queue.put(slot)

    def progress(self) -> tuple[int, dict[str, int]]:
        """``(devices whose first check finished, outcomes of every check so far)``."""
        with self._lock:
            return self.ready, dict(self.outcomes)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._retry_wake.notify_all()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            slot = self._queue.get()
            if slot is None:
                return
            with self._lock:
                if self._stopping:
                    return
                slot.queued, slot.running = False, True
            outcome: Outcome | None = None
            try:
                outcome = slot.device.check()
            except Exception as e:
                # A bug must cost one check, not the process with its hundreds of devices.
                self._counters.add("check_errors")
                log.exception("%s: check failed: %s", slot.device.device_id, e)
            with self._lock:
                slot.running = False
                if outcome is not None:
                    self.outcomes[outcome.value] += 1
                if not slot.checked:
                    slot.checked = True
                    self.ready += 1
                if outcome is Outcome.FAILED or outcome is None:
                    heapq.heappush(
                        self._retries,
                        (time.monotonic() + self._retry_s, next(self._retry_ids), slot),
                    )
                    self._retry_wake.notify()
                if slot.again:
                    slot.again = False
                    slot.queued = True
                    self._queue.put(slot)

    def _retry_loop(self) -> None:
        with self._lock:
            while not self._stopping:
                now = time.monotonic()
                if self._retries and self._retries[0][0] <= now:
                    _, _, slot = heapq.heappop(self._retries)
                    if slot.running:
                        slot.again = True
                    elif not slot.queued:
                        slot.queued = True
                        self._queue.put(slot)
                    continue
                timeout = self._retries[0][0] - now if self._retries else None
                self._retry_wake.wait(timeout)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _report(
    config: WorkerConfig,
    slots: list[_Slot],
    scheduler: _Scheduler,
    counters: Counters,
    *,
    final: bool = False,
    error: str | None = None,
) -> WorkerReport:
    models = Counter(slot.device.model for slot in slots)
    ready, outcomes = scheduler.progress()
    return WorkerReport(
        index=config.index,
        devices=len(config.devices),
        connected=sum(1 for slot in slots if slot.device.transport.connected),
        ready=ready,
        models=dict(models),
        counters=counters.snapshot(),
        peak_rss_mb=_peak_rss_mb(),
        cpu_s=_cpu_s(),
        final=final,
        error=error,
        outcomes=outcomes,
    )


def _telemetry_loop(slots: list[_Slot], interval_s: float, stop: threading.Event) -> None:
    """Each device sends a window every `interval_s`, the devices spread over it."""
    step = interval_s / max(1, len(slots))
    span = max(1, round(interval_s))
    next_at = time.monotonic()
    while not stop.is_set():
        for slot in slots:
            delay = next_at - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            next_at += step
            if slot.device.transport.connected:
                slot.device.publish_window(int(time.time()), span)


def run_worker(config: WorkerConfig, reports: MpQueue[WorkerReport], stop: MpEvent) -> None:
    """The worker process: simulate `config.devices` until `stop` is set."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s sim-worker-{config.index} %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    counters = Counters()
    scheduler = _Scheduler(config.concurrency, config.retry_s, counters)
    slots: list[_Slot] = []
    local_stop = threading.Event()
    error: str | None = None
    try:
        for spec in config.devices:
            home = config.work_dir / spec.device_id
            device = SimDevice(
                spec,
                home,
                root_json=config.root_json,
                broker=(config.host, config.port),
                options=config.options,
                counters=counters,
            )
            slots.append(_Slot(device))
        scheduler.start()
        for slot in slots:
            _start_device(slot, scheduler)
            time.sleep(_CONNECT_SPREAD_S)
        if config.telemetry_interval_s > 0:
            threading.Thread(
                target=_telemetry_loop,
                args=(slots, config.telemetry_interval_s, local_stop),
                name="telemetry",
                daemon=True,
            ).start()
        while not stop.wait(config.report_interval_s):
            reports.put(_report(config, slots, scheduler, counters))
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        log.exception("worker %d failed", config.index)
    finally:
        local_stop.set()
        scheduler.stop()
        for slot in slots:
            slot.device.stop()
        reports.put(_report(config, slots, scheduler, counters, final=True, error=error))
        shutil.rmtree(config.work_dir, ignore_errors=True)


def _start_device(slot: _Slot, scheduler: _Scheduler) -> None:
    """Connect the device; its first check runs once it is connected (as the agent checks
    at start), later ones on each newer ``notify``."""
    device = slot.device
    first = threading.Event()

    def on_connect() -> None:
        if not first.is_set():
            first.set()
            scheduler.wake(slot)

    def on_notify(_topic: str, payload: bytes) -> None:
        # On the network thread: decide quickly, the check itself runs on the pool.
        if device.wants_check(payload):
            scheduler.wake(slot)

    device.transport.add_connect_hook(on_connect)
    device.start(on_notify)
