"""Fleet-scale benchmarks: a rollout to N simulated devices, telemetry ingest, the overview.

Rollout (this script): a loopback Mosquitto (limits raised for a thousand clients), a real
signed repository with a bundle of about ``--bundle-mb`` MB (the ONNX reference bundle
plus a file of random bytes), the real `ChunkServer` and `FleetPublisher` in this process,
and ``--devices`` simulated devices in ``--processes`` processes (`hil.fleet_sim`: real
MQTT connections, python-tuf verification, chunked downloads; no unpack, gate or
inference). Once every device trusts the current metadata, all devices are assigned the
bundle in one wave (a `RolloutService` rollout of one 100 % wave, created and ticked once,
or ``--assign assign-many``: `FleetRepository.assign_many`; either signs the director
role once), and the clock runs until every device has reported ``activated`` on its
events topic.

Measured: ``rollout_s`` (assignment to the last ``activated``), ``artifact_reads`` (bytes
the chunk server read from its artifact store for ``models/`` divided by the bundle size),
bytes on the wire per device (topic + payload, both directions) and the metadata share of
them, the size of the signed director metadata, peak RSS of each simulation process, and
CPU seconds of mosquitto, the simulation processes and the chunk server's thread during
the rollout.

Ingest and overview: ``hil.ingest_bench.measure_ingest`` / ``measure_overview``.

Prints one JSON object with ``--json`` (nothing else on stdout); progress goes to stderr.

Usage: scripts/bench_fleet.py [--json] [--devices 1000] [--processes 4] [--only rollout]
                              [--assign rollout|assign-many]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for hil and tests.mqtt_broker, when run as a script

from edge_agent.protocol.events import EventKind  # noqa: E402
from fleet_server.repository import FleetRepository  # noqa: E402
from hil.fleet_rig import ServerRig, make_repository, release_bundle, utc_now  # noqa: E402
from hil.fleet_sim import FleetCounters, FleetSim, SimError, describe  # noqa: E402
from hil.sim_device import DeviceOptions  # noqa: E402
from tests.mqtt_broker import MosquittoBroker  # noqa: E402

MB = 1024 * 1024
ONNX_BUNDLE = ROOT / "models" / "reference-onnx"
MODEL = "reference-onnx"
PARTS = ("rollout", "ingest", "overview")
GOALS = {
    "rollout_s": 120.0,
    "artifact_reads": 1.0,
    "ingest_per_s": 2000.0,
    "overview_p99_ms": 200.0,
}
_TICK_S = os.sysconf("SC_CLK_TCK")


class ScaleBroker(MosquittoBroker):
    """The test broker with limits for a thousand clients: no per-client queue limit (a
    QoS 0 chunk answer over the limit would be dropped) and a larger in-flight window."""

    EXTRA = ("max_queued_messages 0", "max_inflight_messages 100", "max_connections -1")

    def __init__(self) -> None:
        super().__init__(start_timeout_s=20.0)
        conf = self._conf.read_text(encoding="utf-8")
        self._conf.write_text(conf + "\n".join(self.EXTRA) + "\n", encoding="utf-8")

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid


def _cpu_of(stat_path: Path) -> float:
    """utime + stime of a /proc .../stat file, in seconds (0 when it is gone)."""
    try:
        fields = stat_path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK_S


def _thread_cpu(name: str) -> float:
    """CPU seconds of this process's thread called ``name`` (paho names its threads)."""
    for thread in threading.enumerate():
        if thread.name == name and thread.native_id is not None:
            return _cpu_of(Path(f"/proc/self/task/{thread.native_id}/stat"))
    return 0.0


@dataclass
class CpuMark:
    mosquitto: float
    chunk_server: float
    server_process: float
    sim: float


def _cpu_mark(broker: ScaleBroker, counters: FleetCounters) -> CpuMark:
    pid = broker.pid
    return CpuMark(
        mosquitto=0.0 if pid is None else _cpu_of(Path(f"/proc/{pid}/stat")),
        chunk_server=_thread_cpu("paho-mqtt-client-fleet-server"),
        server_process=time.process_time(),
        sim=sum(counters.cpu_s),
    )


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_rollout(args: argparse.Namespace) -> dict[str, Any]:
    """The rollout benchmark; returns its keys for the JSON report.

    Raises:
        SimError: the simulation failed or did not get ready in time.
    """
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="bench-fleet-", dir=shm if shm.is_dir() else None))
    broker = ScaleBroker()
    try:
        repo = make_repository(base / "fleet")
        target, length = release_bundle(
            repo,
            ONNX_BUNDLE,
            "2",
            base / "bundles",
            runtime="onnx",
            profiles=["x86-generic"],
            tar_bytes=int(args.bundle_mb * MB),
        )
        _progress(f"released {target}: {length} bytes")
        broker.start()
        with ServerRig(broker.host, broker.port, repo, poll_interval_s=0.2) as rig:
            options = DeviceOptions(window=args.window)
            sim = FleetSim(
                broker.host,
                broker.port,
                args.devices,
                args.processes,
                repo.metadata_dir / "1.root.json",
                work_dir=base / "sim",
                concurrency=args.concurrency,
                options=options,
            )
            started = time.monotonic()
            with sim:
                sim.wait_connected(args.timeout)
                ready = sim.wait_ready(args.timeout, lambda c: _progress(f"start: {describe(c)}"))
                _progress(f"ready in {time.monotonic() - started:.1f} s: {describe(ready)}")
                running = _Running(repo, rig, sim, broker, target, length)
                return _measure_rollout(args, running, ready)
    finally:
        broker.close()
        shutil.rmtree(base, ignore_errors=True)


@dataclass(frozen=True)
class _Running:
    """Everything the rollout measurement talks to."""

    repo: FleetRepository
    rig: ServerRig
    sim: FleetSim
    broker: ScaleBroker
    target: str
    length: int


def _measure_rollout(
    args: argparse.Namespace, running: _Running, before: FleetCounters
) -> dict[str, Any]:
    repo, rig, sim, broker = running.repo, running.rig, running.sim, running.broker
    target, length = running.target, running.length
    devices = len(sim.specs)
    assign = _rollout_assigner(args, running) if args.assign == "rollout" else None
    cpu0 = _cpu_mark(broker, before)
    read0 = rig.chunks.bytes_read["targets/models"]
    t0 = time.monotonic()
    if assign is not None:
        assigned_via = assign()
    else:
        repo.assign_many(dict.fromkeys(sim.device_ids, target), now=utc_now())
        assigned_via = "FleetRepository.assign_many (one director signing)"
    assign_s = time.monotonic() - t0
    director_bytes = (repo.metadata_dir / "director.json").stat().st_size
    _progress(f"assigned {devices} devices in {assign_s:.2f} s; director.json {director_bytes} B")
    deadline = t0 + args.timeout
    next_progress = t0
    while not rig.wait_count(EventKind.ACTIVATED, target, devices, 1.0):
        now = time.monotonic()
        sim.wait(lambda _c: True, 1.0, "a report")  # raises if a worker died
        if now >= next_progress:
            next_progress = now + 5.0
            _progress(
                f"[{now - t0:6.1f} s] activated {rig.count(EventKind.ACTIVATED, target)}"
                f"/{devices}; {describe(sim.counters())}"
            )
        if now >= deadline:
            break
    activated = rig.count(EventKind.ACTIVATED, target)
    rollout_s = time.monotonic() - t0 if activated == devices else None
    time.sleep(2 * 0.25)  # one more report from every worker
    after = sim.counters()
    cpu1 = _cpu_mark(broker, after)

    def delta(name: str) -> int:
        return after.get(name) - before.get(name)

    wire = delta("bytes_in") + delta("bytes_out")
    bundle = delta("bundle_bytes")
    _progress(f"rollout: {activated}/{devices} activated in {time.monotonic() - t0:.1f} s")
    return {
        "rollout_devices": devices,
        "rollout_activated": activated,
        "rollout_s": None if rollout_s is None else round(rollout_s, 2),
        "artifact_reads": round((rig.chunks.bytes_read["targets/models"] - read0) / length, 3),
        "assigned_via": assigned_via,
        "assign_s": round(assign_s, 3),
        "bundle_bytes": length,
        "director_json_bytes": director_bytes,
        "wire_bytes_per_device": round(wire / devices),
        "bundle_bytes_per_device": round(bundle / devices),
        "metadata_answer_bytes_per_device": round((delta("answer_bytes") - bundle) / devices),
        "chunk_retries": delta("chunk_retries"),
        "failed_events": delta("event.failed"),
        "refused_events": delta("event.refused"),
        "sim_processes": args.processes,
        "sim_concurrency_per_process": args.concurrency,
        "sim_window": args.window,
        "sim_peak_rss_mb": [round(r, 1) for r in after.peak_rss_mb],
        "cpu_s": {
            "mosquitto": round(cpu1.mosquitto - cpu0.mosquitto, 1),
            "sim": round(cpu1.sim - cpu0.sim, 1),
            "chunk_server_thread": round(cpu1.chunk_server - cpu0.chunk_server, 1),
            "server_process": round(cpu1.server_process - cpu0.server_process, 1),
        },
    }


def _rollout_assigner(args: argparse.Namespace, running: _Running) -> Callable[[], str]:
    """Prepare a one-wave rollout through `RolloutService` (before the clock starts: the
    devices table as the ingest fills it from the retained states, the release registry
    as the driver mirrors it); the returned call creates the rollout and ticks once,
    which signs the wave's assignments.

    Raises:
        SimError: a device's state never arrived, or the rollout would skip devices.
    """
    from fleet_server.rollouts import (
        GateLimits,
        Registry,
        RolloutService,
        RolloutTarget,
        WaveSpec,
    )
    from fleet_server.storage import TelemetryStore, open_database

    rig, sim = running.rig, running.sim
    if not rig.wait_until(lambda: all(d in rig.states for d in sim.device_ids), args.timeout):
        raise SimError("not every device's retained state reached the observer")
    engine = open_database(f"sqlite:///{running.repo.metadata_dir.parent.parent / 'fleet.db'}")
    store = TelemetryStore(engine)
    now = utc_now()
    for device_id in sim.device_ids:
        store.record_state(device_id, rig.states[device_id], now)
    Registry(engine).sync(running.repo, now=now)
    service = RolloutService(engine, running.repo)
    release = f"{MODEL}@2"
    preview = service.preview(release, RolloutTarget())
    if len(preview.targeted) != len(sim.device_ids):
        raise SimError(f"the rollout would skip devices: {preview.skipped[:3]}")

    def assign() -> str:
        service.create(
            release,
            RolloutTarget(),
            [WaveSpec(percent=100)],
            GateLimits(),
            pause_s=0,
            auto_rollback=False,
            actor="bench",
            now=utc_now(),
        )
        for line in service.tick(utc_now()):
            _progress(line)
        return "RolloutService.create + tick (one wave of 100 %, one director signing)"

    return assign


def run_ingest_parts(parts: set[str]) -> dict[str, Any]:
    """The ingest and overview numbers, from ``hil.ingest_bench``.

    Raises:
        SimError: that module or its functions are missing.
    """
    try:
        module = importlib.import_module("hil.ingest_bench")
    except ImportError as e:
        raise SimError(f"hil.ingest_bench is not available ({e}); use --only rollout") from e
    result: dict[str, Any] = {}
    for part, name in (("ingest", "measure_ingest"), ("overview", "measure_overview")):
        if part not in parts:
            continue
        measure: Callable[[], dict[str, Any]] | None = getattr(module, name, None)
        if measure is None:
            raise SimError(f"hil.ingest_bench has no {name}(); use --only rollout")
        _progress(f"{part}: hil.ingest_bench.{name}()")
        result.update(measure())
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print only the JSON report on stdout")
    p.add_argument("--devices", type=int, default=1000, help="simulated devices (%(default)s)")
    p.add_argument("--processes", type=int, default=4, help="simulation processes (%(default)s)")
    p.add_argument(
        "--concurrency", type=int, default=8, help="concurrent checks per process (%(default)s)"
    )
    p.add_argument("--window", type=int, default=8, help="chunk requests in flight per device")
    p.add_argument("--bundle-mb", type=float, default=5.0, help="bundle size (%(default)s MB)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per phase")
    p.add_argument(
        "--assign",
        choices=("rollout", "assign-many"),
        default="rollout",
        help="how the wave is assigned: a RolloutService rollout (devices and releases in "
        "a SQLite database) or FleetRepository.assign_many directly (%(default)s)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=PARTS,
        help="run only this part (repeatable); default: all",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    parts = set(args.only or PARTS)
    report: dict[str, Any] = {"machine_note": "2 cores, shared with other work while measured"}
    try:
        if "rollout" in parts:
            report.update(run_rollout(args))
        if parts & {"ingest", "overview"}:
            report.update(run_ingest_parts(parts))
    except SimError as e:
        print(f"bench_fleet: error: {e}", file=sys.stderr)
        return 1
    report["goals"] = {k: v for k, v in GOALS.items() if k in report}
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
