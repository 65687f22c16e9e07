"""A seeded fleet database for console, API and demo tests: ``seed_fleet(root)``.

What it makes, all real and all under ``root``:

- ``keys/`` and ``repo/``: fresh signing keys and a TUF repository holding two signed
  releases of the reference model, ``reference-onnx@1.0.0`` (the bundle in
  ``models/reference-onnx``) and ``reference-onnx@1.1.0`` (the same files re-sealed as
  the next version), both for every firmware profile with the ONNX runtime; the
  ``releases`` table is filled from it by ``Registry.sync``.
- ``fleet.db`` (or ``db_url``): ``devices`` devices ``cam-001``.. spread over three lines
  (groups), two sites and the ONNX profiles; most online, every fifth one offline (it
  stopped sending three quarters of the way through and its last will arrived), the
  last one ``unknown`` (telemetry but no state yet). The first
  two devices switched from 1.0.0 to 1.1.0 half way through their history (update
  events ``gate_passed`` and ``activated``); the others run 1.0.0.
- ``windows`` telemetry windows per device, one every ``window_s`` seconds, ending at
  ``now``: frames drawn around the model's reference profile (per-frame features from
  the profile's means and standard deviations, P(defect) from its histogram), closed by
  the agent's real ``WindowAccumulator``, encoded and decoded by the wire code and
  stored as the rows ``TelemetryStore.add_window`` writes. ``DRIFTING`` (``cam-003``)
  sees its light darken over the second half: brightness, contrast and colour means
  fall to ``DRIFT_FACTOR`` of normal.
- drift alerts: every window also goes through the real ``FleetDriftMonitor`` and
  ``AlertStore`` (reference profiles from the signed repository), so the darkening
  device ends with open ``brightness down`` alerts and the others stay quiet.
- operators ``admin``, ``operator`` and ``viewer`` with the passwords in ``PASSWORDS``.

Also here: ``fleet_context(fleet)`` wires an ``AppContext`` over the seeded database and
repository, and ``serve_http(app)`` serves an app with a real uvicorn server on a free
loopback port (the console's browser test and ``scripts/console_screenshots.py`` use
both).

Deterministic for a given ``seed``; a few seconds for the default size.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine, update

from edge_agent.bundle import seal_bundle
from edge_agent.core.stats import WindowAccumulator, edges_of
from edge_agent.protocol.events import EventKind, UpdateEvent, decode_event, encode_event
from edge_agent.protocol.manifest import FEATURE_NAMES, Decision, ReferenceProfile
from edge_agent.protocol.state import DeviceState, Status
from edge_agent.protocol.telemetry import TelemetryWindow, decode_window, encode_window
from edge_agent.update.unpack import pack_bundle
from fleet_server.app import AppContext
from fleet_server.auth import Auth
from fleet_server.compatibility import find_profiles, release_profiles
from fleet_server.repository import FleetRepository, init_keys, release_path
from fleet_server.rollouts import Registry, RolloutService
from fleet_server.storage import AlertStore, TelemetryStore, open_database
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.fleet_views import FleetViews
from fleet_server.storage.schema import Device, TelemetryWindowRow, UpdateEventRow
from fleet_server.workers.drift_monitor import FleetDriftMonitor
from fleet_server.workers.references import ReferenceLibrary
from tests.mqtt_broker import free_port

ROOT = Path(__file__).resolve().parents[1]
ONNX_BUNDLE = ROOT / "models" / "reference-onnx"
PROFILES_DIR = ROOT / "firmware_profiles"
MODEL_NAME = "reference-onnx"
OLD_VERSION, NEW_VERSION = "1.0.0", "1.1.0"
OLD_MODEL, NEW_MODEL = f"{MODEL_NAME}@{OLD_VERSION}", f"{MODEL_NAME}@{NEW_VERSION}"
EDGE_VERSION = "0.1.0"
LINES = ("line-1", "line-2", "line-3")
SITES = ("plant-a", "plant-b")
DEVICE_PROFILES = ("rpi4", "rpi5", "x86-generic", "jetson-orin-nano")
DRIFTING = "cam-003"
DRIFT_FACTOR = 0.8  # brightness at the end of the drifting device's history
UPGRADED = ("cam-001", "cam-002")
# Debian chromium, headless as root, without the background traffic a closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORDS = {"admin": "admin-password", "operator": "operator-password", "viewer": "viewer-pass"}
SEED_NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
_DARKENED = ("brightness", "contrast", "r_mean", "g_mean", "b_mean")
_ERROR_RATE = 0.002


@dataclass(frozen=True)
class SeededFleet:
    """What ``seed_fleet`` made (paths, handles and names the tests assert on)."""

    root: Path
    db_url: str
    engine: Engine
    repository: FleetRepository
    repo_dir: Path
    keys_dir: Path
    references: ReferenceLibrary
    now: datetime
    devices: tuple[str, ...]
    online: tuple[str, ...]
    offline: tuple[str, ...]
    unknown: tuple[str, ...]
    drifting: str
    models: tuple[str, str]  # (old, new)
    targets: tuple[str, str]  # their release target paths
    open_alerts: tuple[int, ...]
    windows_per_device: int

    def line_of(self, device_id: str) -> str:
        return LINES[self.devices.index(device_id) % len(LINES)]


def seed_fleet(
    root: Path,
    *,
    devices: int = 12,
    windows: int = 40,
    window_s: int = 60,
    now: datetime = SEED_NOW,
    seed: int = 0,
    db_url: str | None = None,
    alerts: bool = True,
) -> SeededFleet:
    """Seed a fleet under ``root`` (see the module docstring); returns what was made.

    ``alerts`` False skips the drift monitor (faster for large fleets; no alerts then).

    Raises:
        ValueError: fewer than 4 devices or 4 windows (the roles above need them).
    """
    if devices < 4 or windows < 4:
        raise ValueError(f"need at least 4 devices and 4 windows, got {devices} and {windows}")
    root.mkdir(parents=True, exist_ok=True)
    start = now - timedelta(seconds=windows * window_s)
    keys_dir, repo_dir = root / "keys", root / "repo"
    repository = _signed_repository(root, keys_dir, repo_dir, start - timedelta(days=1))
    url = db_url or f"sqlite:///{root / 'fleet.db'}"
    engine = open_database(url)
    Registry(engine).sync(repository, now=start - timedelta(hours=12))
    auth = Auth(engine)
    for username, password in PASSWORDS.items():
        auth.create_operator(username, password, username, actor="seed", now=start)

    ids = tuple(f"cam-{i:03d}" for i in range(1, devices + 1))
    offline = tuple(d for i, d in enumerate(ids[:-1], 1) if i % 5 == 0 and d != DRIFTING)
    unknown = (ids[-1],)
    online = tuple(d for d in ids if d not in offline and d not in unknown)
    references = ReferenceLibrary(repo=repo_dir)
    reference = references.get(OLD_MODEL)
    if reference is None:
        raise RuntimeError(f"the seeded repository has no reference for {OLD_MODEL}")
    store = TelemetryStore(engine)
    monitor = FleetDriftMonitor(store, AlertStore(engine), references) if alerts else None

    for i, device_id in enumerate(ids):
        if device_id in unknown:
            continue
        state = DeviceState(
            Status.ONLINE,
            ts=int(start.timestamp()),
            model=OLD_MODEL,
            edge=EDGE_VERSION,
            profile=DEVICE_PROFILES[i % len(DEVICE_PROFILES)],
            line=LINES[i % len(LINES)],
        )
        store.record_state(device_id, state, start)
        _store_events(engine, device_id, _provisioned(repository, start))
        if monitor is not None:
            monitor.on_state(device_id, state)
    _set_sites(engine, ids)

    rng = np.random.default_rng(seed)
    streams = {
        d: _DeviceStream(d, reference.profile, reference.decision, rng, i)
        for i, d in enumerate(ids)
    }
    switch = windows // 2
    gone = (3 * windows) // 4  # offline devices stopped sending here
    stored: list[tuple[str, TelemetryWindow, datetime]] = []
    for k in range(windows):
        t0 = start + timedelta(seconds=k * window_s)
        t1 = t0 + timedelta(seconds=window_s)
        for device_id in ids:
            if device_id in offline and k >= gone:
                continue
            stream = streams[device_id]
            model = NEW_MODEL if device_id in UPGRADED and k >= switch else OLD_MODEL
            if device_id in UPGRADED and k == switch:
                _upgrade(engine, store, device_id, repository, t0)
            darken = 1.0
            if device_id == DRIFTING and k >= switch:
                darken = 1.0 - (1.0 - DRIFT_FACTOR) * (k - switch + 1) / (windows - switch)
            # What the device sends, decoded as ingest decodes it.
            window = decode_window(encode_window(stream.window(k, t0, t1, model, darken)))
            stored.append((device_id, window, t1))
            if monitor is not None:
                monitor.on_window(device_id, window, t1)
    _store_windows(engine, stored)
    for device_id in offline:
        last_seen = start + timedelta(seconds=gone * window_s + 30)
        store.record_state(device_id, DeviceState(Status.OFFLINE), last_seen)
    open_ids = tuple(a.id for a in AlertStore(engine).alerts(open_only=True))
    return SeededFleet(
        root=root,
        db_url=url,
        engine=engine,
        repository=repository,
        repo_dir=repo_dir,
        keys_dir=keys_dir,
        references=references,
        now=now,
        devices=ids,
        online=online,
        offline=offline,
        unknown=unknown,
        drifting=DRIFTING,
        models=(OLD_MODEL, NEW_MODEL),
        targets=(release_path(MODEL_NAME, OLD_VERSION), release_path(MODEL_NAME, NEW_VERSION)),
        open_alerts=open_ids,
        windows_per_device=windows,
    )


def fleet_context(fleet: SeededFleet, clock: Callable[[], datetime] | None = None) -> AppContext:
    """An ``AppContext`` over the seeded database and repository (the server's own
    wiring, with the seeded reference profiles). ``clock`` defaults to the seed's ``now``
    moving forward in real time, so sessions and rollouts made in a test come after the
    seeded history."""
    if clock is None:
        started = time.monotonic()

        def clock() -> datetime:
            return fleet.now + timedelta(seconds=time.monotonic() - started)

    profiles = find_profiles([PROFILES_DIR])
    return AppContext(
        engine=fleet.engine,
        auth=Auth(fleet.engine),
        rollouts=RolloutService(fleet.engine, fleet.repository, profiles=profiles),
        registry=Registry(fleet.engine),
        views=FleetViews(fleet.engine, fleet.references),
        clock=clock,
        repository=fleet.repository,
    )


@contextmanager
def serve_http(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` with a real uvicorn server on a free loopback port, in a thread;
    yields the base URL and stops the server on exit.

    Raises:
        RuntimeError: the server did not start within 15 s.
    """
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=free_port(host), log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="console-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15.0
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the HTTP server did not start within 15 s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class _DeviceStream:
    """One device's frames: its own frame rate and latency, the reference's features."""

    def __init__(
        self,
        device_id: str,
        profile: ReferenceProfile,
        decision: Decision,
        rng: np.random.Generator,
        index: int,
    ) -> None:
        self.device_id = device_id
        self.profile = profile
        self.decision = decision
        self.rng = rng
        self.edges = edges_of(profile)
        self.frames = 150 + 25 * (index % 5)  # 2.5 to 4.2 frames/s over a minute
        self.latency_ms = 3.0 + 1.5 * (index % 4)
        p = profile.features["p_defect"]
        weights = np.asarray(p.counts, dtype=np.float64)
        self.p_weights = weights / weights.sum()
        self.p_bounds = [p.edges[0], *p.edges, p.edges[-1]]

    def window(
        self, seq: int, t0: datetime, t1: datetime, model: str, darken: float
    ) -> TelemetryWindow:
        n = self.frames
        rows = np.empty((n, len(FEATURE_NAMES) - 1))
        for j, name in enumerate(FEATURE_NAMES[:-1]):
            ref = self.profile.features[name]
            scale = darken if name in _DARKENED else 1.0
            rows[:, j] = self.rng.normal(ref.mean * scale, ref.std, n)
        bins = self.rng.choice(len(self.p_weights), size=n, p=self.p_weights)
        lo = np.asarray(self.p_bounds[:-1])[bins]
        hi = np.asarray(self.p_bounds[1:])[bins]
        p_defect = np.clip(lo + (hi - lo) * self.rng.random(n), 0.0, 1.0)
        latency = self.rng.lognormal(math.log(self.latency_ms), 0.35, n)
        errors = self.rng.random(n) < _ERROR_RATE
        acc = WindowAccumulator(self.edges, max_frames=max(n, 50), max_seconds=math.inf)
        start, span = t0.timestamp(), (t1 - t0).total_seconds()
        for k in range(n):
            at = start + span * k / n
            if errors[k]:
                acc.add("error", None, 0.0, float(latency[k]), at)
                continue
            p = float(p_defect[k])
            outcome = (
                "fail"
                if p >= self.decision.t_fail
                else "uncertain"
                if p >= self.decision.t_uncertain
                else "pass"
            )
            acc.add(outcome, rows[k], p, float(latency[k]), at)
        window = acc.close(t1.timestamp(), seq=seq, model=model, edge=EDGE_VERSION)
        if window is None:
            raise RuntimeError(f"{self.device_id}: window {seq} did not close")
        return window


def _signed_repository(
    root: Path, keys_dir: Path, repo_dir: Path, when: datetime
) -> FleetRepository:
    init_keys(keys_dir)
    repository = FleetRepository(repo_dir / "metadata", keys_dir, repo_dir / "targets")
    repository.create(now=when)
    profiles = release_profiles("onnx", find_profiles([PROFILES_DIR]), None)
    bundles = root / "bundles"
    newer = bundles / f"{MODEL_NAME}-{NEW_VERSION}"
    shutil.copytree(ONNX_BUNDLE, newer)
    draft = json.loads((newer / "bundle.json").read_bytes())
    del draft["files"]
    draft["version"] = NEW_VERSION
    draft["description"] = draft.get("description", "") + " Retrained on more variant-a data."
    seal_bundle(newer, draft)
    for version, bundle, hours in ((OLD_VERSION, ONNX_BUNDLE, 0), (NEW_VERSION, newer, 6)):
        tar = bundles / f"{MODEL_NAME}-{version}.tar"
        pack_bundle(bundle, tar)
        repository.add_release(
            MODEL_NAME,
            version,
            tar,
            runtime="onnx",
            profiles=list(profiles),
            now=when + timedelta(hours=hours),
        )
    return repository


def _store_windows(engine: Engine, stored: Sequence[tuple[str, TelemetryWindow, datetime]]) -> None:
    """The windows as ``TelemetryStore.add_window`` stores them (the same row and device
    fields), in one transaction: one commit per window would make seeding slow."""
    with Transaction(session_factory(engine)(), "storing seeded windows") as session:
        for device_id, window, received in stored:
            device = session.get(Device, device_id)
            if device is None:
                device = Device(
                    id=device_id,
                    status="unknown",
                    drift=[],
                    first_seen=received,
                    last_seen=received,
                )
                session.add(device)
            device.last_seen = received
            device.model = window.model
            device.edge_version = window.edge
            session.add(
                TelemetryWindowRow(
                    device_id=device_id,
                    seq=window.seq,
                    model=window.model,
                    ref=window.ref,
                    t0=window.t0,
                    t1=window.t1,
                    frames=window.frames,
                    window=json.loads(encode_window(window)),
                    received_at=received,
                )
            )


def _set_sites(engine: Engine, ids: Sequence[str]) -> None:
    # An operator's fact (a device does not know its site): written as the API would.
    with Transaction(session_factory(engine)(), "setting seeded sites") as session:
        for i, device_id in enumerate(ids):
            session.execute(
                update(Device).where(Device.id == device_id).values(site=SITES[i % len(SITES)])
            )


def _provisioned(repository: FleetRepository, at: datetime) -> list[UpdateEvent]:
    target = release_path(MODEL_NAME, OLD_VERSION)
    sha = _sha256(repository, target)
    return [UpdateEvent(EventKind.ACTIVATED, at.timestamp() - 3600, target=target, sha256=sha)]


def _sha256(repository: FleetRepository, target: str) -> str | None:
    info = repository.released(target)
    return None if info is None else info.hashes.get("sha256")


def _upgrade(
    engine: Engine,
    store: TelemetryStore,
    device_id: str,
    repository: FleetRepository,
    at: datetime,
) -> None:
    """The device's side of an update to NEW_MODEL: its events, then its new state."""
    target = release_path(MODEL_NAME, NEW_VERSION)
    sha = _sha256(repository, target)
    ts = at.timestamp()
    sent = [
        UpdateEvent(EventKind.DOWNLOADING, ts - 40, target=target, sha256=sha, percent=100),
        UpdateEvent(EventKind.VERIFIED, ts - 30, target=target, sha256=sha),
        UpdateEvent(
            EventKind.GATE_PASSED,
            ts - 10,
            target=target,
            sha256=sha,
            figures={"agreement": 0.995, "p99_latency_ms": 9.5, "golden_passed": 4.0},
        ),
        UpdateEvent(EventKind.ACTIVATED, ts, target=target, sha256=sha),
    ]
    _store_events(engine, device_id, sent)
    store.record_state(
        device_id,
        DeviceState(Status.ONLINE, ts=int(ts), model=NEW_MODEL, edge=EDGE_VERSION),
        at,
    )


def _store_events(engine: Engine, device_id: str, sent: Sequence[UpdateEvent]) -> None:
    # Events are stored as ingest stores them: decoded from the bytes the device sends,
    # received when the device's clock says they were sent.
    with Transaction(session_factory(engine)(), f"storing events of {device_id}") as session:
        for event in sent:
            got = decode_event(encode_event(event))  # exactly what the wire carries
            session.add(
                UpdateEventRow(
                    device_id=device_id,
                    event=got.event.value,
                    ts=got.ts,
                    target=got.target,
                    sha256=got.sha256,
                    percent=got.percent,
                    reason=got.reason,
                    detail=got.detail,
                    figures=dict(got.figures),
                    received_at=datetime.fromtimestamp(got.ts, timezone.utc),
                )
            )
