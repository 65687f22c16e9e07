"""The server side of a fleet simulation: a real signed repository, the real `ChunkServer`
and `FleetPublisher`, and an observer of what the devices report.

Shared by ``scripts/bench_fleet.py`` and the fleet simulation test:

- `make_repository`: fresh keys and version 1 of every role (as ``fleet-server keys init
  --repo`` does);
- `release_bundle`: copy a bundle directory as a new version (optionally padded with a
  file of random bytes, listed in its manifest, to reach a size), pack it and publish it
  in the release role;
- `ServerRig`: one server MQTT connection with the chunk server and the publisher's loop
  (retained ``notify`` on every new timestamp), plus a second connection that records every
  device's update events and retained state, as the fleet server's ingest sees them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from edge_agent.bundle import copy_bundle
from edge_agent.protocol import topics
from edge_agent.protocol.events import EventKind, UpdateEvent, decode_event
from edge_agent.protocol.state import DeviceState, decode_state
from edge_agent.transport import MqttTransport
from edge_agent.update.unpack import pack_bundle
from fleet_server.repository import FleetRepository, init_keys, release_path
from fleet_server.serve import FleetPublisher
from fleet_server.workers.chunk_server import ChunkServer

log = logging.getLogger("hil.fleet_rig")

_CONNECT_TIMEOUT_S = 10.0
PADDING_FILE = "padding.bin"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def make_repository(base: Path) -> FleetRepository:
    """Keys in ``base/keys``, a fresh repository in ``base/repo/{metadata,targets}``.

    Raises:
        RepositoryError: ``base/repo`` already holds a repository.
    """
    init_keys(base / "keys")
    repo = FleetRepository(base / "repo" / "metadata", base / "keys", base / "repo" / "targets")
    repo.create(now=utc_now())
    return repo


def release_bundle(
    repo: FleetRepository,
    source: Path,
    version: str,
    work: Path,
    *,
    runtime: str,
    profiles: list[str],
    tar_bytes: int = 0,
) -> tuple[str, int]:
    """Publish ``source`` re-sealed as ``version``; return ``(target path, tar length)``.

    With ``tar_bytes`` > 0, a file of random bytes is added (and listed in the manifest)
    so that the tar is about that long.

    Raises:
        BundleError: ``source`` does not verify.
        RepositoryError: the release is refused.
    """
    work.mkdir(parents=True, exist_ok=True)

    def pad(_draft: dict[str, Any], dest: Path) -> None:
        current = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        missing = tar_bytes - current
        if missing > 0:
            (dest / PADDING_FILE).write_bytes(os.urandom(missing))

    bundle = copy_bundle(source, work / f"bundle-{version}", version=version, edit=pad)
    tar = work / f"bundle-{version}.tar"
    pack_bundle(bundle.path, tar)
    name = bundle.manifest.name
    repo.add_release(name, version, tar, runtime=runtime, profiles=profiles, now=utc_now())
    return release_path(name, version), tar.stat().st_size


class ServerRig:
    """Chunk server, publisher loop and observer against a running broker.

    Args:
        host, port: the broker.
        repo: the repository to serve and announce.
        poll_interval_s: how often the publisher looks for a new timestamp.

    Raises (from `start`):
        RuntimeError: a connection to the broker did not come up.
    """

    def __init__(
        self, host: str, port: int, repo: FleetRepository, *, poll_interval_s: float = 0.2
    ) -> None:
        self.repo = repo
        self.server_transport = MqttTransport(host=host, port=port, client_id="fleet-server")
        self.observer = MqttTransport(host=host, port=port, client_id="fleet-observer")
        self.chunks = ChunkServer(
            self.server_transport, repo.metadata_dir, repo.targets_dir, logger=log
        )
        self.publisher = FleetPublisher(
            self.server_transport, repo, poll_interval_s=poll_interval_s, logger=log
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self.publisher.run, args=(self._stop,), name="publisher", daemon=True
        )
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.events: dict[str, list[UpdateEvent]] = {}
        self.states: dict[str, DeviceState] = {}
        self.kinds: Counter[EventKind] = Counter()
        # (kind, target or None) -> devices that reported it: counts without rescanning.
        self._reporters: dict[tuple[EventKind, str | None], set[str]] = {}
        self.bad_messages = 0
        self.observer.subscribe(topics.device_filter("events"), self._on_event, qos=1)
        self.observer.subscribe(topics.device_filter("state"), self._on_state, qos=1)

    def start(self) -> None:
        for transport in (self.server_transport, self.observer):
            transport.start()
            if not transport.wait_connected(_CONNECT_TIMEOUT_S):
                self.stop()
                raise RuntimeError("the fleet server rig cannot connect to the broker")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.observer.stop()
        self.server_transport.stop()

    def count(self, kind: EventKind, target: str | None = None) -> int:
        """Devices that reported ``kind`` (for ``target``, if given) at least once."""
        with self._lock:
            return len(self._reporters.get((kind, target), ()))

    def wait_count(self, kind: EventKind, target: str | None, count: int, timeout_s: float) -> bool:
        """Block until `count` devices reported ``kind`` for ``target`` (None: any)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: len(self._reporters.get((kind, target), ())) >= count,
                timeout=timeout_s,
            )

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Block until ``predicate()`` (called with no lock held) is true after an event
        or a state arrives, or ``timeout_s`` passes; return its last value."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                self._changed.wait(min(remaining, 0.5))
        return True

    def device_events(self, device_id: str) -> list[UpdateEvent]:
        with self._lock:
            return list(self.events.get(device_id, []))

    def _on_event(self, topic: str, payload: bytes) -> None:
        parsed = topics.parse(topic)
        try:
            event = decode_event(payload)
        except ValueError:
            with self._lock:
                self.bad_messages += 1
            return
        if parsed is None:
            return
        with self._changed:
            self.events.setdefault(parsed[0], []).append(event)
            self.kinds[event.event] += 1
            for key in ((event.event, None), (event.event, event.target)):
                self._reporters.setdefault(key, set()).add(parsed[0])
            self._changed.notify_all()

    def _on_state(self, topic: str, payload: bytes) -> None:
        parsed = topics.parse(topic)
        if parsed is None or not payload:
            return
        try:
            state = decode_state(payload)
        except ValueError:
            with self._lock:
                self.bad_messages += 1
            return
        with self._changed:
            self.states[parsed[0]] = state
            self._changed.notify_all()

    def __enter__(self) -> ServerRig:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
