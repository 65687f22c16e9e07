"""Fleet simulation: N simulated devices in a few processes against a real broker and a
real fleet server.

Each device (`hil.sim_device.SimDevice`) has its own MQTT connection, retained state and
offline will, and runs the agent's real update client: python-tuf verification over MQTT
(`TrustClient` + `MqttFetcher`), the chunked, resumable `BundleDownloader`, and the real
update events; it skips unpacking, the health gate and inference (see that module). The
devices are split over ``processes`` worker processes (`hil.sim_worker`), each with a
bounded number of concurrent checks.

Use it from Python::

    with FleetSim("127.0.0.1", 1883, devices=1000, processes=4, root_json=root) as sim:
        sim.wait_ready(120)
        ...  # assign a release on the server
        sim.wait(lambda c: c.models.get("reference-onnx@2", 0) == 1000, 120, "activated")

or from the shell, with progress on stderr until Ctrl-C::

    python -m hil.fleet_sim --broker 127.0.0.1:1883 --devices 100 \\
        --root REPO/metadata/1.root.json

A worker that dies makes every wait raise `SimError` with its exit code.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.context
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

from edge_agent.config import ConfigError, load_profile
from hil.sim_device import DeviceOptions, DeviceSpec
from hil.sim_worker import WorkerConfig, WorkerReport, run_worker

DEFAULT_MODEL = "reference-onnx@1"
DEFAULT_PROFILE = "x86-generic"
_STOP_TIMEOUT_S = 60.0


class SimError(RuntimeError):
    """A worker process died or reported a failure, or a wait timed out."""


@dataclass(frozen=True, slots=True)
class FleetCounters:
    """The whole simulation at one moment (the sum of the workers' latest reports)."""

    devices: int = 0
    connected: int = 0
    ready: int = 0  # devices whose first check has finished
    models: dict[str, int] = field(default_factory=dict)  # model id -> devices
    counters: dict[str, int] = field(default_factory=dict)  # see hil.sim_device
    outcomes: dict[str, int] = field(default_factory=dict)  # check outcomes
    peak_rss_mb: tuple[float, ...] = ()  # per worker process
    cpu_s: tuple[float, ...] = ()  # per worker process

    def get(self, name: str) -> int:
        """One counter (0 if never counted): ``event.activated``, ``reason.incompatible``,
        ``bytes_in``, ``answer_bytes``, ``bundle_bytes``, ``windows_sent``, ..."""
        return self.counters.get(name, 0)


def device_specs(
    count: int,
    *,
    prefix: str = "sim",
    profiles: tuple[str, ...] = (DEFAULT_PROFILE,),
    model: str = DEFAULT_MODEL,
    lines: int = 10,
) -> list[DeviceSpec]:
    """``count`` devices ``<prefix>-00000``...; profiles cycle over the devices, runtimes
    come from each firmware profile's TOML, lines ``line-0``... cycle too.

    Raises:
        ConfigError: a profile is unknown.
    """
    runtimes = {name: frozenset(load_profile(name).runtimes) for name in profiles}
    return [
        DeviceSpec(
            device_id=f"{prefix}-{i:05d}",
            profile=profiles[i % len(profiles)],
            runtimes=runtimes[profiles[i % len(profiles)]],
            line=f"line-{i % max(1, lines)}",
            model=model,
        )
        for i in range(count)
    ]


class FleetSim:
    """Simulated devices in ``processes`` worker processes (``spawn``).

    Args:
        broker_host, port: the MQTT broker.
        devices: how many devices, or the exact specs (see `device_specs`).
        processes: worker processes; devices are dealt to them round-robin.
        root_json: the repository's ``1.root.json`` (path or bytes), pinned on every device.
        work_dir: where device homes go (default: a temporary directory, in /dev/shm when
            it exists: thousands of small fsyncs); removed at `stop`.
        concurrency: concurrent checks (downloads) per process.
        telemetry_interval_s: seconds between two windows of one device (0: none).
        retry_s: delay before a retryable failure is checked again.
        options: transfer settings of every device.
        report_interval_s: how often workers report their counters.

    Raises:
        ValueError: fewer than one device or process, or a bad interval.
        OSError: ``root_json`` cannot be read.
    """

    def __init__(
        self,
        broker_host: str,
        port: int,
        devices: int | list[DeviceSpec],
        processes: int,
        root_json: Path | bytes,
        *,
        work_dir: Path | None = None,
        concurrency: int = 8,
        telemetry_interval_s: float = 0.0,
        retry_s: float = 5.0,
        options: DeviceOptions | None = None,
        report_interval_s: float = 0.25,
    ) -> None:
        specs = device_specs(devices) if isinstance(devices, int) else list(devices)
        if not specs or processes < 1 or concurrency < 1:
            raise ValueError("need at least one device, one process and concurrency >= 1")
        if telemetry_interval_s < 0 or retry_s <= 0 or report_interval_s <= 0:
            raise ValueError("intervals must be positive (telemetry: 0 for none)")
        self.specs = specs
        root = root_json if isinstance(root_json, bytes) else root_json.read_bytes()
        self._own_dir = work_dir is None
        shm = Path("/dev/shm")
        base = work_dir or Path(
            tempfile.mkdtemp(prefix="fleet-sim-", dir=shm if shm.is_dir() else None)
        )
        self.work_dir = base
        processes = min(processes, len(specs))
        self._configs = [
            WorkerConfig(
                index=i,
                host=broker_host,
                port=port,
                devices=tuple(specs[i::processes]),
                root_json=root,
                work_dir=base / f"worker-{i}",
                options=options or DeviceOptions(),
                concurrency=concurrency,
                telemetry_interval_s=telemetry_interval_s,
                retry_s=retry_s,
                report_interval_s=report_interval_s,
            )
            for i in range(processes)
        ]
        self._ctx = multiprocessing.get_context("spawn")
        self._reports: multiprocessing.Queue[WorkerReport] = self._ctx.Queue()
        self._stop = self._ctx.Event()
        self._procs: list[multiprocessing.context.SpawnProcess] = []
        self._latest: dict[int, WorkerReport] = {}
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None
        self._reading = threading.Event()

    @property
    def device_ids(self) -> list[str]:
        return [spec.device_id for spec in self.specs]

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers (for CPU and memory accounting)."""
        return [p.pid for p in self._procs if p.pid is not None]

    def start(self) -> None:
        """Start the worker processes; returns at once (see `wait_connected`)."""
        if self._procs:
            raise RuntimeError("FleetSim.start() called twice")
        self._reading.set()
        self._reader = threading.Thread(target=self._read_reports, name="sim-reports", daemon=True)
        self._reader.start()
        for config in self._configs:
            proc = self._ctx.Process(
                target=run_worker,
                args=(config, self._reports, self._stop),
                name=f"fleet-sim-{config.index}",
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> FleetCounters:
        """Stop every worker (devices disconnect cleanly) and return the final counters.
        A worker that does not end in ``timeout_s`` is terminated. Idempotent."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        # Final reports first: a child blocks at exit until its queue is drained.

        def settled() -> bool:
            for index, proc in enumerate(self._procs):
                report = self._latest.get(index)
                if proc.exitcode is None and (report is None or not report.final):
                    return False
            return True

        with self._changed:
            self._changed.wait_for(settled, timeout=timeout_s)
        for proc in self._procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self._reading.clear()
        if self._reader is not None:
            self._reader.join(5)
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        return self.counters()

    def counters(self) -> FleetCounters:
        """The latest counters of every worker, summed."""
        with self._changed:
            reports = list(self._latest.values())
        counters: Counter[str] = Counter()
        models: Counter[str] = Counter()
        outcomes: Counter[str] = Counter()
        for report in reports:
            counters.update(report.counters)
            models.update(report.models)
            outcomes.update(report.outcomes)
        return FleetCounters(
            devices=len(self.specs),
            connected=sum(r.connected for r in reports),
            ready=sum(r.ready for r in reports),
            models=dict(models),
            counters=dict(counters),
            outcomes=dict(outcomes),
            peak_rss_mb=tuple(r.peak_rss_mb for r in sorted(reports, key=lambda r: r.index)),
            cpu_s=tuple(r.cpu_s for r in sorted(reports, key=lambda r: r.index)),
        )

    def wait(
        self,
        predicate: Callable[[FleetCounters], bool],
        timeout_s: float,
        what: str,
        progress: Callable[[FleetCounters], None] | None = None,
        progress_interval_s: float = 5.0,
    ) -> FleetCounters:
        """Block until ``predicate(counters)`` holds; ``progress(counters)`` every
        ``progress_interval_s``. Returns the counters that satisfied it.

        Raises:
            SimError: ``timeout_s`` passed (the message names ``what`` and the counters),
                or a worker died or failed.
        """
        deadline = time.monotonic() + timeout_s
        next_progress = time.monotonic() + progress_interval_s
        while True:
            self._check_workers()
            current = self.counters()
            if predicate(current):
                return current
            now = time.monotonic()
            if now >= deadline:
                raise SimError(f"timed out after {timeout_s:.0f} s waiting for {what}: {current}")
            if progress is not None and now >= next_progress:
                next_progress = now + progress_interval_s
                progress(current)
            with self._changed:
                self._changed.wait(min(0.5, deadline - now))

    def wait_connected(self, timeout_s: float) -> FleetCounters:
        """Every device is connected to the broker."""
        return self.wait(lambda c: c.connected == c.devices, timeout_s, "all devices connected")

    def wait_ready(
        self, timeout_s: float, progress: Callable[[FleetCounters], None] | None = None
    ) -> FleetCounters:
        """Every device has finished its first check (it trusts the current metadata)."""
        return self.wait(lambda c: c.ready == c.devices, timeout_s, "first checks", progress)

    def _check_workers(self) -> None:
        with self._changed:
            failed = [r for r in self._latest.values() if r.error is not None]
        if failed:
            raise SimError(f"worker {failed[0].index} failed: {failed[0].error}")
        if self._stop.is_set():
            return
        for proc in self._procs:
            if proc.exitcode is not None:
                raise SimError(f"worker {proc.name} exited with code {proc.exitcode}")

    def _read_reports(self) -> None:
        while self._reading.is_set():
            try:
                report = self._reports.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._changed:
                self._latest[report.index] = report
                self._changed.notify_all()

    def __enter__(self) -> FleetSim:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def describe(counters: FleetCounters) -> str:
    """One progress line."""
    models = ", ".join(f"{m}: {n}" for m, n in sorted(counters.models.items()))
    return (
        f"{counters.connected}/{counters.devices} connected, {counters.ready} checked, "
        f"activated {counters.get('event.activated')}, refused {counters.get('event.refused')}"
        f", failed {counters.get('event.failed')}, windows {counters.get('windows_sent')}, "
        f"in {counters.get('bytes_in') / 1e6:.1f} MB; models: {models}"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hil.fleet_sim",
        description="Simulate N devices (real MQTT, TUF verification and chunk fetches, "
        "synthetic telemetry; no inference) against a running broker and fleet server. "
        "Prints progress to stderr every few seconds; stops on Ctrl-C.",
    )
    p.add_argument("--broker", required=True, metavar="HOST:PORT", help="the MQTT broker")
    p.add_argument("--devices", type=int, default=100, help="how many devices (%(default)s)")
    p.add_argument("--processes", type=int, default=2, help="worker processes (%(default)s)")
    p.add_argument(
        "--root", required=True, type=Path, metavar="ROOT_JSON", help="REPO/metadata/1.root.json"
    )
    p.add_argument("--prefix", default="sim", help="device id prefix (%(default)s)")
    p.add_argument(
        "--profiles",
        default=DEFAULT_PROFILE,
        metavar="P1,P2",
        help="firmware profiles, cycled over the devices (%(default)s)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="factory model, name@version")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent checks per process")
    p.add_argument(
        "--telemetry-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds between two windows of one device; 0: no telemetry (%(default)s)",
    )
    p.add_argument("--progress", type=float, default=5.0, metavar="SECONDS")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        print(f"fleet_sim: error: --broker must be HOST:PORT, got {args.broker!r}", file=sys.stderr)
        return 2
    try:
        profiles = tuple(p.strip() for p in args.profiles.split(",") if p.strip())
        specs = device_specs(args.devices, prefix=args.prefix, profiles=profiles, model=args.model)
        sim = FleetSim(
            host,
            int(port),
            specs,
            args.processes,
            args.root,
            concurrency=args.concurrency,
            telemetry_interval_s=args.telemetry_interval,
        )
    except (ConfigError, ValueError, OSError) as e:
        print(f"fleet_sim: error: {e}", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sim.start()
    started = time.monotonic()
    try:
        while not stopping.wait(args.progress):
            sim.wait(lambda _c: True, 1.0, "a report")  # raises if a worker died
            elapsed = time.monotonic() - started
            print(f"[{elapsed:6.1f} s] {describe(sim.counters())}", file=sys.stderr)
    except SimError as e:
        print(f"fleet_sim: error: {e}", file=sys.stderr)
        sim.stop()
        return 1
    final = sim.stop()
    print(f"stopped: {describe(final)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
