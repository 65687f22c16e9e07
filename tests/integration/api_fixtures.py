"""A seeded fleet server app for API and console tests.

``seeded_api(tmp)`` builds, in ``tmp``: a SQLite database; a real signed repository
(keys, metadata, targets) holding two releases of the ONNX reference bundle
(``reference-onnx@1.0.0`` and ``@1.1.0``, mirrored into the registry); twelve devices on
two lines (``line-a``: ``dev-00``..``dev-05`` at ``site-1``; ``line-b``: ``dev-06``..
``dev-11`` at ``site-2``; all ``x86-generic``, running 1.0.0, every fourth one offline);
``WINDOWS`` telemetry windows per device (valid wire windows: they pass
``decode_window``); update events on ``dev-00`` (downloaded, gate passed, activated); one
open drift alert on ``dev-03`` and one resolved on ``line-b``; and an operator account
per role (``viewer``, ``operator``, ``admin``, password ``PASSWORD``) with an API token
each (``SeededApi.tokens[role]``).

The clock is fixed (``NOW``) unless ``clock`` is given. ``app`` is built with
``console=False`` unless asked; ``client(role)`` gives a ``TestClient`` that sends that
role's token. The console's tests may reuse all of this.

Seeding takes about a second (keys, bundles, scrypt); tests that each need a fresh
database build one template per session (``build_seeded``) and copy it per test
(``copy_seeded``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy import Engine
from starlette.testclient import TestClient

from edge_agent.protocol.telemetry import (
    LATENCY_EDGES_MS,
    Moments,
    TelemetryWindow,
    encode_window,
)
from fleet_server.app import AppContext, create_app
from fleet_server.auth import Auth, Role
from fleet_server.releasing import release_bundle
from fleet_server.repository import FleetRepository, init_keys
from fleet_server.rollouts import Registry, RolloutService
from fleet_server.storage import TelemetryStore, open_database
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.fleet_views import FleetViews
from fleet_server.storage.schema import AlertRow, Device, UpdateEventRow
from tests.update_rig import make_bundle

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
PASSWORD = "correct-horse-battery"
MODEL = "reference-onnx"
OLD, NEW = f"{MODEL}@1.0.0", f"{MODEL}@1.1.0"
PROFILE = "x86-generic"
WINDOWS = 5
WINDOW_FRAMES = 200
DB_FILE = "fleet.db"
TOKENS_FILE = "tokens.json"
DEVICES = tuple(f"dev-{i:02d}" for i in range(12))


def line_of(device_id: str) -> str:
    return "line-a" if int(device_id[-2:]) < 6 else "line-b"


@dataclass(frozen=True)
class SeededApi:
    app: FastAPI
    ctx: AppContext
    engine: Engine
    repository: FleetRepository
    tokens: dict[str, str]
    now: datetime

    def client(self, role: str | None = None) -> TestClient:
        """A client for ``app`` sending ``role``'s token (None: no credentials)."""
        headers = {} if role is None else {"Authorization": f"Bearer {self.tokens[role]}"}
        return TestClient(self.app, headers=headers, raise_server_exceptions=False)


def seeded_api(
    tmp: Path, *, console: bool = False, clock: Callable[[], datetime] | None = None
) -> SeededApi:
    """Everything the module docstring lists, under ``tmp`` (created if missing)."""
    build_seeded(tmp)
    return open_seeded(tmp, console=console, clock=clock)


def copy_seeded(
    template: Path,
    dest: Path,
    *,
    console: bool = False,
    clock: Callable[[], datetime] | None = None,
) -> SeededApi:
    """A private copy of a ``build_seeded`` directory, opened: much faster than seeding
    again (no key generation, no bundle packing, no password hashing)."""
    shutil.copytree(template, dest, dirs_exist_ok=True)
    return open_seeded(dest, console=console, clock=clock)


def build_seeded(root: Path) -> None:
    """Write the seeded database, keys and repository under ``root`` (and the operators'
    tokens to ``root/tokens.json``, for ``open_seeded``)."""
    root.mkdir(parents=True, exist_ok=True)
    engine = open_database(str(root / DB_FILE))
    try:
        repository = signed_repository(root)
        Registry(engine).sync(repository, now=NOW)
        seed_fleet(engine, NOW)
        auth = Auth(engine)
        tokens = {}
        for role in Role:
            auth.create_operator(role.value, PASSWORD, role, actor="seed", now=NOW)
            tokens[role.value] = auth.issue_token(role.value, "tests", actor="seed", now=NOW)
    finally:
        engine.dispose()  # closes the last connection: SQLite folds the WAL into the file
    (root / TOKENS_FILE).write_text(json.dumps(tokens))


def open_seeded(
    root: Path, *, console: bool = False, clock: Callable[[], datetime] | None = None
) -> SeededApi:
    """The app over a ``build_seeded`` directory."""
    engine = open_database(str(root / DB_FILE))
    repository = _repository(root)
    ctx = AppContext(
        engine=engine,
        auth=Auth(engine),
        rollouts=RolloutService(engine, repository),
        registry=Registry(engine),
        views=FleetViews(engine),
        clock=clock or (lambda: NOW),
        repository=repository,
    )
    tokens = json.loads((root / TOKENS_FILE).read_text())
    return SeededApi(create_app(ctx, console=console), ctx, engine, repository, tokens, NOW)


def signed_repository(tmp: Path) -> FleetRepository:
    """A real repository with fresh keys and releases 1.0.0 and 1.1.0 of the reference
    model for every profile that runs ONNX."""
    init_keys(tmp / "keys")
    repository = _repository(tmp)
    repository.create(now=NOW)
    for i, version in enumerate(("1.0.0", "1.1.0")):
        bundle = make_bundle(tmp / "bundles" / version, version)
        release_bundle(repository, bundle, now=NOW + timedelta(seconds=i))
    return repository


def _repository(root: Path) -> FleetRepository:
    return FleetRepository(root / "repo" / "metadata", root / "keys", root / "repo" / "targets")


def seed_fleet(engine: Engine, now: datetime) -> None:
    """Devices, windows, update events and alerts (see the module docstring)."""
    store = TelemetryStore(engine)
    for device_id in DEVICES:
        for seq in range(1, WINDOWS + 1):
            t1 = int(now.timestamp()) - (WINDOWS - seq) * 60
            window = make_window(seq, t1, brightness=0.45 + 0.01 * seq)
            document = json.loads(encode_window(window))
            store.add_window(device_id, window, document, now - timedelta(minutes=WINDOWS - seq))
    with Transaction(session_factory(engine)(), "seeding the fleet") as session:
        for i, device_id in enumerate(DEVICES):
            row = session.get(Device, device_id)
            assert row is not None
            row.line = line_of(device_id)
            row.site = "site-1" if row.line == "line-a" else "site-2"
            row.profile = PROFILE
            row.model = OLD
            row.edge_version = "0.1.0"
            row.status = "offline" if i % 4 == 3 else "online"
        for kind, figures in (
            ("verified", {}),
            ("gate_passed", {"agreement": 0.99, "p99_latency_ms": 12.5}),
            ("activated", {}),
        ):
            session.add(
                UpdateEventRow(
                    device_id="dev-00",
                    event=kind,
                    ts=now.timestamp() - 3600,
                    target=f"models/{MODEL}-1.0.0.tar",
                    figures=figures,
                    received_at=now - timedelta(hours=1),
                )
            )
        session.add(_alert("device", "dev-03", ["dev-03"], now, resolved=False))
        session.add(_alert("line", "line-b", ["dev-06", "dev-07"], now, resolved=True))


def make_window(seq: int, t1: int, *, brightness: float) -> TelemetryWindow:
    """A window of WINDOW_FRAMES frames that passes the privacy rules."""
    bins = len(LATENCY_EDGES_MS) + 1
    latency = [10] * bins
    latency[5] += WINDOW_FRAMES - 10 * bins  # most frames between 7.5 and 10 ms
    n = WINDOW_FRAMES
    return TelemetryWindow(
        seq=seq,
        t0=t1 - 60,
        t1=t1,
        model=OLD,
        edge="0.1.0",
        ref="0123456789abcdef",
        counts={"pass": 180, "fail": 16, "uncertain": 3, "error": 1, "dropped": 0},
        moments={"brightness": Moments(n, brightness * n, brightness**2 * n)},
        latency=latency,
    )


def _alert(scope: str, key: str, devices: list[str], now: datetime, *, resolved: bool) -> AlertRow:
    return AlertRow(
        scope=scope,
        scope_key=key,
        feature="brightness",
        test="cusum",
        direction="down",
        effect=0.4,
        statistic=9.0,
        threshold=5.0,
        p_value=None,
        since_seq=2,
        since_t=now - timedelta(minutes=3),
        devices=devices,
        evidence={"windows": 3},
        opened_at=now - timedelta(minutes=2),
        updated_at=now - timedelta(minutes=1),
        resolved_at=now if resolved else None,
        quiet=0,
        webhook_status="none",
        webhook_attempts=0,
    )
