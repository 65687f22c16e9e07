"""``fleet-server serve``: the one place that wires a whole fleet server process.

On one MQTT connection: the chunk server (answers devices' fetch requests), the publisher
(retained ``notify``, re-signing online roles). With a database (``--db``) also: telemetry
ingest with the drift monitor, the devices' update events, the rollout driver (waves,
gates, rollback) and the HTTP server (REST API under ``/api/v1`` and the console). Start
order is bottom-up and stop order the reverse, so nothing a component needs is gone
before it stops.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime

import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine

from edge_agent.protocol import topics
from edge_agent.transport import MqttTransport
from fleet_server.app import AppContext, create_app
from fleet_server.auth import Auth
from fleet_server.ingest_service import IngestOptions, start_ingest
from fleet_server.repository import FleetRepository
from fleet_server.rollouts import Registry, RolloutService
from fleet_server.serve import FleetPublisher, utc_now
from fleet_server.storage import open_database
from fleet_server.storage.fleet_views import FleetViews
from fleet_server.workers.chunk_server import ChunkServer
from fleet_server.workers.rollout_driver import RolloutDriver
from fleet_server.workers.update_events import UpdateEventIngest

_CONNECT_WAIT_S = 5.0
_HTTP_START_S = 10.0


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """What ``serve`` runs. ``db`` None: only the chunk server and the publisher."""

    refresh_interval_s: float
    db: str | None = None
    http: tuple[str, int] | None = None
    ingest: IngestOptions | None = None
    tick_s: float = 1.0


class HttpServer:
    """uvicorn on its own thread; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="off", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)
        self.host = host
        self.port = port

    def start(self) -> None:
        """Start serving; returns once the socket is bound.

        Raises:
            OSError: the server did not come up (address in use, ...).
        """
        self._thread.start()
        stop = threading.Event()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive():
                raise OSError(f"HTTP server on {self.host}:{self.port} did not start")
            stop.wait(0.02)
            waited += 0.02
            if waited > _HTTP_START_S:
                raise OSError(f"HTTP server on {self.host}:{self.port} did not start in time")
        sockets = [s for server in self._server.servers for s in server.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(10.0)


@dataclass
class RunningServer:
    """Handles on a started server (for the demo and tests)."""

    engine: Engine | None
    context: AppContext | None
    http: HttpServer | None


def start_server(
    options: ServerOptions,
    transport: MqttTransport,
    fleet: FleetRepository,
    stack: ExitStack,
    logger: logging.Logger,
    *,
    clock: Callable[[], datetime] = utc_now,
) -> tuple[RunningServer, FleetPublisher]:
    """Wire and start everything on ``transport`` (not started yet); every stop is pushed
    on ``stack``. Returns the handles and the publisher, whose ``run(stop)`` is the main
    loop.

    Raises:
        StorageError: the database cannot be opened.
        OSError: the HTTP server cannot bind.
    """
    ChunkServer(transport, fleet.metadata_dir, fleet.targets_dir, logger)
    publisher = FleetPublisher(
        transport, fleet, refresh_interval_s=options.refresh_interval_s, logger=logger
    )
    running = RunningServer(None, None, None)
    if options.db is not None:
        engine = open_database(options.db)
        stack.callback(engine.dispose)
        registry = Registry(engine)
        registry.sync(fleet, now=clock())
        rollouts = RolloutService(engine, fleet)
        context = AppContext(
            engine=engine,
            auth=Auth(engine),
            rollouts=rollouts,
            registry=registry,
            views=FleetViews(engine),
            clock=clock,
            repository=fleet,
        )
        running = RunningServer(engine, context, None)
        if options.ingest is not None:
            stack.enter_context(start_ingest(options.ingest, transport, engine, logger))
        events = UpdateEventIngest(rollouts, clock, logger=logger)
        transport.subscribe(topics.device_filter("events"), events.handle, qos=1)
        stack.callback(events.stop)
        driver = RolloutDriver(
            rollouts, registry, fleet, clock=clock, interval_s=options.tick_s, logger=logger
        )
        driver.start()
        stack.callback(driver.stop)
        if options.http is not None:
            http = HttpServer(create_app(context), *options.http)
            http.start()
            stack.callback(http.stop)
            running.http = http
            logger.info("console and API on http://%s:%d", http.host, http.port)
    transport.start()
    stack.callback(transport.stop)
    if not transport.wait_connected(_CONNECT_WAIT_S):
        logger.warning("broker not reachable yet; retrying in the background")
    return running, publisher
