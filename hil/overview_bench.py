"""The fleet overview benchmark: ``GET /api/v1/overview`` over uvicorn on a big database.

``measure_overview`` seeds ``devices`` devices and ``windows`` full-size windows
(``seed_fleet``: executemany in large transactions, progress on stderr), then times the
overview over a real uvicorn server (``fleet_server.server.HttpServer``) with an httpx
client: p50 and p99 over ``requests`` calls after ``warmup`` ones.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, insert

from edge_agent.protocol.telemetry import encode_window
from fleet_server.app import AppContext, create_app
from fleet_server.auth import Auth
from fleet_server.rollouts import Registry, RolloutService
from fleet_server.server import HttpServer
from fleet_server.storage import StorageError, TelemetryStore, open_database
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.fleet_views import FleetViews
from fleet_server.storage.schema import AlertRow, Device, TelemetryWindowRow
from hil.bench_windows import T0, TEMPLATES, WINDOW_FRAMES, WINDOW_S, device_id, window_templates


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


_SEED_CHUNK = 50_000
_STATUSES = ("online",) * 8 + ("offline",) * 2


def seed_fleet(engine: Engine, *, devices: int, windows: int, now: datetime) -> None:
    """``devices`` devices on ten lines and ``windows`` full-size windows spread evenly
    over them (executemany, ``_SEED_CHUNK`` rows per transaction), and one open drift
    alert per line; progress on stderr. A database that holds them already is kept.

    Raises:
        StorageError: the database failed.
    """
    store = TelemetryStore(engine)
    have_devices, have_windows = len(store.devices()), store.count_windows()
    if have_devices >= devices and have_windows >= windows:
        _progress(f"overview: reusing {have_devices} devices, {have_windows} windows")
        return
    if have_devices or have_windows:
        raise StorageError(f"{engine.url}: holds a different fleet; give an empty database")
    templates = [json.loads(encode_window(w)) for w in window_templates(TEMPLATES, seed=3)]
    per_device = -(-windows // devices)
    with Transaction(session_factory(engine)(), "seeding devices") as session:
        session.execute(
            insert(Device),
            [
                {
                    "id": device_id(i),
                    "line": f"line-{i % 10}",
                    "site": f"site-{i % 3}",
                    "profile": "x86-generic",
                    "model": "reference-onnx@1.0.0" if i % 4 else "reference-onnx@1.1.0",
                    "edge_version": "0.1.0",
                    "status": _STATUSES[i % len(_STATUSES)],
                    "drift": [],
                    "first_seen": now - timedelta(days=30),
                    "last_seen": now - timedelta(seconds=i % 600),
                }
                for i in range(devices)
            ],
        )
        session.execute(
            insert(AlertRow),
            [
                {
                    "scope": "line",
                    "scope_key": f"line-{k}",
                    "feature": "brightness",
                    "test": "cusum",
                    "direction": "down",
                    "statistic": 9.0,
                    "threshold": 5.0,
                    "since_seq": 1,
                    "since_t": now - timedelta(hours=1),
                    "devices": [device_id(k)],
                    "evidence": {},
                    "opened_at": now - timedelta(minutes=k),
                    "updated_at": now,
                }
                for k in range(10)
            ],
        )
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    done = 0
    for seq in range(1, per_device + 1):
        for i in range(devices):
            if done + len(rows) >= windows:
                break
            document = templates[(i + seq) % len(templates)]
            t0 = T0 + (seq - 1) * WINDOW_S
            rows.append(
                {
                    "device_id": device_id(i),
                    "seq": seq,
                    "model": document["model"],
                    "ref": document["ref"],
                    "t0": t0,
                    "t1": t0 + WINDOW_S,
                    "frames": WINDOW_FRAMES,
                    "window": document,
                    "received_at": now - timedelta(seconds=(per_device - seq) * WINDOW_S),
                }
            )
            if len(rows) == _SEED_CHUNK:
                done += _insert_windows(engine, rows)
                rows = []
                rate = done / (time.monotonic() - started)
                _progress(f"overview: seeded {done}/{windows} windows ({rate:.0f}/s)")
    if rows:
        done += _insert_windows(engine, rows)
    _progress(f"overview: seeded {done} windows in {time.monotonic() - started:.0f} s")


def _insert_windows(engine: Engine, rows: list[dict[str, Any]]) -> int:
    with Transaction(session_factory(engine)(), "seeding windows") as session:
        session.execute(insert(TelemetryWindowRow), rows)
    return len(rows)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_overview(
    db_url: str | None = None,
    *,
    devices: int = 1000,
    windows: int = 1_000_000,
    requests: int = 300,
    warmup: int = 20,
) -> dict[str, Any]:
    """p50 and p99 of ``GET /api/v1/overview`` over uvicorn, on a seeded database
    (``db_url``; None: a SQLite file in a temporary directory, removed afterwards).

    Raises:
        StorageError: the database cannot be opened or seeded.
        RuntimeError: the API answered with an error.
    """
    if db_url is None:
        workdir = Path(tempfile.mkdtemp(prefix="overview-bench-"))
        try:
            return measure_overview(
                f"sqlite:///{workdir / 'overview.db'}",
                devices=devices,
                windows=windows,
                requests=requests,
                warmup=warmup,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    now = datetime.now(timezone.utc)
    engine = open_database(db_url)
    try:
        seed_fleet(engine, devices=devices, windows=windows, now=now)
        auth = Auth(engine)
        user = f"bench-{int(time.time())}"
        auth.create_operator(user, "bench-password-1", "viewer", actor="bench", now=now)
        token = auth.issue_token(user, "bench", actor="bench", now=now)
        context = AppContext(
            engine=engine,
            auth=auth,
            rollouts=RolloutService(engine, None),
            registry=Registry(engine),
            views=FleetViews(engine),
            clock=lambda: datetime.now(timezone.utc),
        )
        http = HttpServer(create_app(context, console=False), "127.0.0.1", 0)
        http.start()
        try:
            url = f"http://127.0.0.1:{http.port}/api/v1/overview"
            times: list[float] = []
            with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as client:
                for k in range(warmup + requests):
                    started = time.perf_counter()
                    response = client.get(url)
                    elapsed = time.perf_counter() - started
                    if response.status_code != 200:
                        raise RuntimeError(
                            f"overview: HTTP {response.status_code}: {response.text}"
                        )
                    if k >= warmup:
                        times.append(elapsed * 1000.0)
            body = response.json()
        finally:
            http.stop()
    finally:
        engine.dispose()
    return {
        "overview_devices": body["devices"]["total"],
        "overview_windows": windows,
        "overview_requests": requests,
        "overview_p50_ms": round(_percentile(times, 0.50), 2),
        "overview_p99_ms": round(_percentile(times, 0.99), 2),
        "overview_max_ms": round(max(times), 2),
    }
