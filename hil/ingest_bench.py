"""Telemetry ingest and fleet overview benchmarks (``scripts/bench_fleet.py`` calls these).

``measure_ingest``: a loopback Mosquitto, a real ``fleet-server ingest`` process on a
fresh SQLite file, a ``mosquitto_sub`` on the same telemetry topics, and several
publisher processes that send pre-encoded, realistic windows (``window_templates``: the
agent's ``WindowAccumulator`` over per-frame features drawn from the reference profile of
the ONNX reference bundle, so every window is full size: moments, histograms, P(defect)
sums, latency) for ``devices`` devices, as fast as the broker takes them. Measured in the
same run: windows stored per second (the database's highest row id, polled), and the
rate at which ``mosquitto_sub`` received the same messages; the ratio is ingest / raw.

``measure_overview`` (from ``hil.overview_bench``): seeds ``devices`` devices and
``windows`` windows into a database (executemany in large transactions, progress on
stderr), then times ``GET /api/v1/overview`` over a real uvicorn server (p50, p99).

``python -m hil.ingest_bench [--json] [--only ingest|overview]``: one JSON object on
stdout with ``--json``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier as MpBarrier
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for hil and tests.mqtt_broker, when run as a script

from edge_agent.protocol import topics  # noqa: E402
from edge_agent.transport import MqttTransport  # noqa: E402
from hil.bench_windows import ONNX_BUNDLE, TEMPLATES, stream, window_templates  # noqa: E402
from hil.overview_bench import measure_overview  # noqa: E402
from tests.mqtt_broker import MosquittoBroker  # noqa: E402

__all__ = ["FLEET_SERVER", "measure_ingest", "measure_overview"]

FLEET_SERVER = Path(sys.executable).with_name("fleet-server")
MOSQUITTO_SUB = "mosquitto_sub"
_STATUS_S = 0.5  # the ingest processes' status line: how the bench sees the drift lag


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BenchBroker(MosquittoBroker):
    """The test broker with no per-client queue limit (a subscriber that falls behind
    would otherwise lose QoS 1 messages past 1,000) and a larger in-flight window."""

    EXTRA = ("max_queued_messages 0", "max_inflight_messages 100", "max_connections -1")

    def __init__(self) -> None:
        super().__init__(start_timeout_s=20.0)
        conf = self._conf.read_text(encoding="utf-8")
        self._conf.write_text(conf + "\n".join(self.EXTRA) + "\n", encoding="utf-8")


@dataclass(frozen=True, slots=True)
class _PublisherJob:
    host: str
    port: int
    name: str
    devices: list[int]
    per_device: int


def _publisher(job: _PublisherJob, ready: MpBarrier, go: MpBarrier) -> None:
    """One publisher process: encode its devices' windows, wait for the start, send all
    at QoS 1 (the transport's queue bounds what is in flight), wait for the PUBACKs."""
    host, port, name, devices = job.host, job.port, job.name, job.devices
    messages = stream(window_templates(TEMPLATES, seed=devices[0]), devices, job.per_device)
    transport = MqttTransport(host=host, port=port, client_id=name, max_queued=2000)
    transport.start()
    if not transport.wait_connected(10):
        raise SystemExit(f"{name}: cannot connect to {host}:{port}")
    ready.wait()
    go.wait()
    last = None
    for topic, payload in messages:
        while True:
            last = transport.publish_tracked(topic, payload)
            if last is not None:
                break
            time.sleep(0.001)
    if last is not None:
        last.wait(120)
    transport.stop()


def _windows_stored(db: Path) -> int:
    """The highest window row id (ids grow by one per stored window on a fresh file)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT max(id) FROM telemetry_windows").fetchone()
    except sqlite3.OperationalError:
        return 0  # not created yet
    return int(row[0] or 0)


class _RawCounter:
    """``mosquitto_sub`` on the telemetry filter; one timestamp line per message."""

    def __init__(self, broker: MosquittoBroker, expected: int) -> None:
        self.times: list[float] = []
        self._proc = subprocess.Popen(
            [
                MOSQUITTO_SUB,
                "-h",
                broker.host,
                "-p",
                str(broker.port),
                "-q",
                "1",
                "-i",
                "bench-raw",
                "-t",
                topics.device_filter("telemetry"),
                "-C",
                str(expected),
                "-F",
                "%U",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.times.append(float(line))

    def wait(self, timeout_s: float) -> None:
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.terminate()
            self._proc.wait(5)
        self._thread.join(5)


def _rate(count: int, first: float, last: float) -> float:
    return (count - 1) / (last - first) if count > 1 and last > first else 0.0


def measure_ingest(
    *,
    devices: int = 1000,
    per_device: int = 20,
    publishers: int = 4,
    workers: int = 1,
    drift: bool = False,
    extra_args: Sequence[str] = (),
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Windows stored per second by ``fleet-server ingest`` and the raw subscriber rate.

    ``workers``: ingest processes on the one shared subscription (``--share fleet``).
    ``drift``: the first of them also runs the drift feed against the reference bundle
    (the others, or all without it, run ``--no-drift``: storing workers). ``extra_args``
    go to every ``fleet-server ingest``.

    Raises:
        RuntimeError: an ingest process ended early, or windows went missing.
    """
    total = devices * per_device
    own = workdir is None
    base = Path(tempfile.mkdtemp(prefix="ingest-bench-")) if workdir is None else workdir
    db = base / "bench.db"
    ctx = multiprocessing.get_context("spawn")
    logs = [base / f"ingest-{k}.log" for k in range(workers)]
    with BenchBroker() as broker, ExitStack() as stack:
        ingest_procs = []
        for k, log_path in enumerate(logs):
            args = [str(FLEET_SERVER), "ingest", "--broker", f"{broker.host}:{broker.port}"]
            args += ["--db", str(db), "--client-id", f"bench-ingest-{k}", *extra_args]
            args += ["--status-interval", str(_STATUS_S)]
            args += ["--bundles", str(ONNX_BUNDLE)] if drift and k == 0 else ["--no-drift"]
            log = stack.enter_context(log_path.open("w"))
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(args, stderr=log, env=env)
            stack.callback(_end, proc)
            ingest_procs.append(proc)
            # One at a time: the first creates the database's tables.
            _wait_log(log_path, "ingesting telemetry", proc, 60)
        raw = _RawCounter(broker, total)
        stack.callback(raw.wait, 60)
        ready, go = ctx.Barrier(publishers + 1), ctx.Barrier(publishers + 1)
        chunks = [list(range(devices))[k::publishers] for k in range(publishers)]
        procs = [
            ctx.Process(
                target=_publisher,
                args=(
                    _PublisherJob(broker.host, broker.port, f"bench-pub-{k}", chunk, per_device),
                    ready,
                    go,
                ),
            )
            for k, chunk in enumerate(chunks)
        ]
        for p in procs:
            p.start()
        _progress(f"ingest: {publishers} publishers encoding {total} windows")
        ready.wait(300)
        time.sleep(1.0)  # let mosquitto_sub subscribe
        _progress(f"ingest: publishing {total} windows of {devices} devices to {workers} ingest")
        go.wait(60)
        published_at = time.time()
        samples = _poll_stored(db, total, ingest_procs)
        published_s = time.time() - published_at
        drift_s = None
        if drift:
            # The drift feed yields to storing: it works through the stored windows now.
            drift_s = _wait_drift(logs[0], total, ingest_procs[0])
            if drift_s is not None:
                drift_s = round(drift_s - samples[-1][0], 1)
        for p in procs:
            p.join(120)
    stored = samples[-1][1] if samples else 0
    if stored != total:
        raise RuntimeError(f"{stored} of {total} windows stored; see the logs in {base}")
    first = next(t for t, n in samples if n > 0)
    ingest_per_s = _rate_from_samples(samples)
    raw_per_s = _rate(len(raw.times), raw.times[0], raw.times[-1]) if raw.times else 0.0
    result = {
        "ingest_devices": devices,
        "ingest_windows": total,
        "ingest_payload_bytes": len(stream(window_templates(1), [0], 1)[0][1]),
        "ingest_per_s": round(ingest_per_s, 1),
        "raw_per_s": round(raw_per_s, 1),
        "raw_received": len(raw.times),
        "ingest_ratio": round(ingest_per_s / raw_per_s, 3) if raw_per_s else None,
        "ingest_first_to_last_s": round(samples[-1][0] - first, 2),
        "ingest_total_s": round(published_s, 2),
        "ingest_workers": workers,
        "ingest_drift": drift,
    }
    if drift:
        result["drift_caught_up_after_s"] = drift_s
        result.update(_drift_status(logs[0]))
    if own:
        shutil.rmtree(base, ignore_errors=True)
    return result


def _wait_log(path: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in path.read_text(encoding="utf-8", errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"fleet-server ingest ended: {path.read_text(encoding='utf-8')}")
        time.sleep(0.05)
    raise RuntimeError(f"fleet-server ingest did not start in {timeout_s} s")


def _poll_stored(
    db: Path, total: int, procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 600.0
) -> list[tuple[float, int]]:
    """(time, windows stored) every 50 ms until all are stored, an ingest process ends,
    or nothing moves for 30 s."""
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout_s
    last_change = time.monotonic()
    while time.monotonic() < deadline:
        n = _windows_stored(db)
        now = time.time()
        if not samples or n != samples[-1][1]:
            samples.append((now, n))
            last_change = time.monotonic()
        ended = any(p.poll() is not None for p in procs)
        if n >= total or ended or time.monotonic() - last_change > 30:
            break
        time.sleep(0.05)
    return samples


def _end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a clean stop that logs the final counters), then wait."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


_DRIFT_STATUS = re.compile(r"drift: fed=(\d+),.*behind: (\d+) windows")


def _wait_drift(
    log: Path, total: int, proc: subprocess.Popen[bytes], timeout_s: float = 600.0
) -> float | None:
    """When (time.time()) the drift feed's status line first said it had fed ``total``
    windows and was behind by none; None if it did not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        status = _drift_status(log)
        if status["drift_fed_at_stop"] == total and status["drift_behind_at_stop"] == 0:
            return time.time()
        time.sleep(_STATUS_S / 4)
    return None


def _drift_status(log: Path) -> dict[str, Any]:
    """The drift feed's last status line (logged at stop): windows fed, windows behind."""
    found = _DRIFT_STATUS.findall(log.read_text(encoding="utf-8", errors="replace"))
    if not found:
        return {"drift_fed_at_stop": None, "drift_behind_at_stop": None}
    fed, behind = found[-1]
    return {"drift_fed_at_stop": int(fed), "drift_behind_at_stop": int(behind)}


def _rate_from_samples(samples: list[tuple[float, int]]) -> float:
    """Windows per second between the first sample with windows and the last one."""
    moving = [(t, n) for t, n in samples if n > 0]
    if len(moving) < 2:
        return 0.0
    (t0, n0), (t1, n1) = moving[0], moving[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--only", choices=("ingest", "overview"), help="run one part")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--per-device", type=int, default=20, help="windows per device (ingest)")
    parser.add_argument("--publishers", type=int, default=4, help="publisher processes")
    parser.add_argument("--workers", type=int, default=1, help="ingest processes (shared)")
    parser.add_argument("--drift", action="store_true", help="ingest runs drift detection too")
    parser.add_argument("--windows", type=int, default=1_000_000, help="stored (overview)")
    parser.add_argument(
        "--db", metavar="URL", help="overview database (default: a SQLite file in a temp dir)"
    )
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    if args.only in (None, "ingest"):
        report.update(
            measure_ingest(
                devices=args.devices,
                per_device=args.per_device,
                publishers=args.publishers,
                workers=args.workers,
                drift=args.drift,
            )
        )
        _progress(f"ingest: {report}")
    if args.only in (None, "overview"):
        report.update(measure_overview(args.db, devices=args.devices, windows=args.windows))
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
