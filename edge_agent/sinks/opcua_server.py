"""An OPC UA server with the latest verdict, counters, model and drift flag (asyncua).

    QueuedOutput(OpcUaVerdicts) -> emit: hand the values to the server's event loop
                                   (its own thread) and wait for the write, bounded

The server runs on its own thread with its own asyncio event loop; ``emit`` runs on the
output's QueuedOutput thread and waits at most ``write_timeout_s`` for the loop, so a
stalled server delays only this output, whose queue then drops (counted). The address
space (namespace ``NAMESPACE_URI``, string node ids under ``EdgeAgent``) is documented in
docs/line-outputs.md; all variables are read-only to clients.

``asyncua`` is imported only here (the ``outputs`` extra).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from edge_agent.sinks.outputs import LineOutputError, OutputUnavailable, VerdictEvent

if TYPE_CHECKING:
    from asyncua.common.node import Node
    from asyncua.server.server import Server

log = logging.getLogger("edge_agent.outputs.opcua")

NAMESPACE_URI = "urn:edgefleet:edge-agent"
ROOT = "EdgeAgent"
NO_P_DEFECT = -1.0  # PDefect of an error verdict: PLCs handle a sentinel better than NaN
START_TIMEOUT_S = 30.0


class OpcUaError(LineOutputError):
    """The OPC UA server could not start or take a value; the message says which."""


@dataclass(frozen=True, slots=True)
class OpcUaValues:
    """Everything the server shows, as plain values (built per verdict, pure)."""

    outcome: str
    label: str
    p_defect: float
    frame_id: int
    captured_at: datetime
    latency_ms: float
    counts: Mapping[str, int]  # by outcome
    model: str
    drifting: bool


def opcua_values(event: VerdictEvent, counts: Mapping[str, int], drifting: bool) -> OpcUaValues:
    """The values for ``event`` (pure)."""
    return OpcUaValues(
        outcome=event.outcome.value,
        label=event.label,
        p_defect=NO_P_DEFECT if event.p_defect is None else event.p_defect,
        frame_id=event.frame_id,
        captured_at=datetime.fromtimestamp(event.captured_at, tz=timezone.utc),
        latency_ms=event.latency_ms,
        counts=dict(counts),
        model=event.model,
        drifting=drifting,
    )


# (browse path under ROOT, OPC UA variant type name, initial value)
VARIABLES: tuple[tuple[str, str, Any], ...] = (
    ("LastVerdict.Outcome", "String", ""),
    ("LastVerdict.Label", "String", ""),
    ("LastVerdict.PDefect", "Double", NO_P_DEFECT),
    ("LastVerdict.FrameId", "Int64", -1),
    ("LastVerdict.Timestamp", "DateTime", datetime.fromtimestamp(0, tz=timezone.utc)),
    ("LastVerdict.LatencyMs", "Double", 0.0),
    ("Counters.Pass", "UInt64", 0),
    ("Counters.Fail", "UInt64", 0),
    ("Counters.Uncertain", "UInt64", 0),
    ("Counters.Error", "UInt64", 0),
    ("Counters.Total", "UInt64", 0),
    ("Model", "String", ""),
    ("Drifting", "Boolean", False),
)


def node_id(namespace_index: int, path: str) -> str:
    """The string form of a variable's node id, e.g. ``ns=2;s=EdgeAgent.Model``."""
    return f"ns={namespace_index};s={ROOT}.{path}" if path else f"ns={namespace_index};s={ROOT}"


def node_values(values: OpcUaValues) -> dict[str, Any]:
    """Browse path -> value for every variable in ``VARIABLES`` (pure)."""
    counts = values.counts
    return {
        "LastVerdict.Outcome": values.outcome,
        "LastVerdict.Label": values.label,
        "LastVerdict.PDefect": values.p_defect,
        "LastVerdict.FrameId": values.frame_id,
        "LastVerdict.Timestamp": values.captured_at,
        "LastVerdict.LatencyMs": values.latency_ms,
        "Counters.Pass": counts.get("pass", 0),
        "Counters.Fail": counts.get("fail", 0),
        "Counters.Uncertain": counts.get("uncertain", 0),
        "Counters.Error": counts.get("error", 0),
        "Counters.Total": sum(counts.values()),
        "Model": values.model,
        "Drifting": values.drifting,
    }


class OpcUaVerdicts:
    """The OPC UA server as a line ``Output``; put it behind a ``QueuedOutput``.

    Args:
        host, port: where the server listens (``opc.tcp://host:port/edgefleet/``).
        counts: the line's verdict counts by outcome, read at each emit (so the counters
            stay right even when this output dropped verdicts).
        drifting: the local drift flag, read at each emit (cheap: cached by the caller).
        write_timeout_s: how long ``emit`` waits for the server's loop.

    Start it with ``start``; ``close`` stops it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        counts: Callable[[], Mapping[str, int]],
        drifting: Callable[[], bool],
        write_timeout_s: float = 2.0,
    ) -> None:
        self.host, self.port = host, port
        self.endpoint = f"opc.tcp://{host}:{port}/edgefleet/"
        self._counts, self._drifting = counts, drifting
        self._timeout = write_timeout_s
        self._loop = asyncio.new_event_loop()
        self._server: Server | None = None
        self._nodes: dict[str, tuple[Node, Any]] = {}
        self._ready = concurrent.futures.Future[None]()
        self._stop = asyncio.Event()  # binds to the server's loop on first use
        self._thread = threading.Thread(target=self._run, name="opcua-server", daemon=True)
        self._task: asyncio.Task[None]  # set by the thread, before anything can cancel it
        self.namespace_index = -1

    @property
    def name(self) -> str:
        return "opcua"

    def start(self) -> None:
        """Check the address, then start the server on its own thread; returns at once.

        The server needs seconds to build its standard address space; the line does not
        wait for it: until it listens, ``emit`` raises ``OutputUnavailable`` (counted as
        dropped). A failure after the address check is logged (``event=opcua_failed``).

        Raises:
            OpcUaError: the address cannot be bound (in use, not local), named.
        """
        try:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # As asyncio's server will: a port in TIME_WAIT is free to use.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((self.host, self.port))
        except OSError as e:
            raise OpcUaError(f"OPC UA server cannot listen on {self.host}:{self.port}: {e}") from e
        # asyncua logs every session, subscription and address-space step at INFO; the
        # agent's journal keeps one line per event of its own.
        logging.getLogger("asyncua").setLevel(logging.WARNING)
        self._thread.start()

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Block until the server listens.

        Raises:
            OpcUaError: it failed to start, or did not start within ``timeout_s``.
        """
        try:
            self._ready.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError as e:
            raise OpcUaError(f"OPC UA server {self.endpoint} did not start in {timeout_s} s") from e

    def emit(self, event: VerdictEvent) -> None:
        """Write the verdict's values; raises OpcUaError (a LineOutputError) on failure."""
        if self._server is None:
            raise OutputUnavailable(f"OPC UA server {self.endpoint} is not listening")
        values = node_values(opcua_values(event, self._counts(), self._drifting()))
        future = asyncio.run_coroutine_threadsafe(self._write(values), self._loop)
        try:
            future.result(timeout=self._timeout)
        except concurrent.futures.TimeoutError as e:
            future.cancel()
            raise OpcUaError(f"OPC UA server {self.endpoint}: write timed out") from e
        except (OSError, RuntimeError, ValueError) as e:
            raise OpcUaError(f"OPC UA server {self.endpoint}: write failed: {e}") from e

    def close(self) -> None:
        """Stop the server and its thread; safe to call twice or before ``start``."""
        if self._thread.is_alive():
            # Still building its address space (seconds): cancel that rather than wait.
            stop = self._stop.set if self._server is not None else self._cancel
            self._loop.call_soon_threadsafe(stop)
            self._thread.join(timeout=10.0)
        elif self._thread.ident is None and not self._loop.is_closed():
            self._loop.close()  # never started: the thread would have closed it

    # -- the server's thread ------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self._serve())
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            if not self._ready.done():
                self._ready.set_exception(OpcUaError(f"OPC UA server {self.endpoint}: closed"))
        finally:
            self._loop.close()

    def _cancel(self) -> None:
        if self._server is None:
            self._task.cancel()
        else:  # it started listening meanwhile: stop it in order
            self._stop.set()

    async def _serve(self) -> None:
        from asyncua import ua
        from asyncua.server.server import Server

        server = Server()
        try:
            await server.init()
            server.set_endpoint(self.endpoint)
            server.set_server_name("edgefleet edge-agent")
            # Anonymous and unencrypted, read-only variables: a line network like Modbus.
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            await self._build(server)
            await server.start()
        except (OSError, RuntimeError, ValueError) as e:
            log.error(
                "OPC UA server %s failed to start: %s",
                self.endpoint,
                e,
                extra={"event": "opcua_failed", "endpoint": self.endpoint},
            )
            self._ready.set_exception(OpcUaError(f"OPC UA server {self.endpoint}: {e}"))
            return
        self._server = server
        self._ready.set_result(None)
        log.info(
            "OPC UA server listening",
            extra={"event": "opcua_listening", "endpoint": self.endpoint},
        )
        try:
            await self._stop.wait()
        finally:
            self._server = None
            await server.stop()

    async def _build(self, server: Server) -> None:
        from asyncua import ua

        idx = await server.register_namespace(NAMESPACE_URI)
        self.namespace_index = idx
        root = await server.nodes.objects.add_object(
            ua.NodeId.from_string(node_id(idx, "")), ua.QualifiedName(ROOT, idx)
        )
        folders: dict[str, Node] = {}
        for path, type_name, initial in VARIABLES:
            parent, _, leaf = path.rpartition(".")
            node_parent = root
            if parent:
                if parent not in folders:
                    folders[parent] = await root.add_object(
                        ua.NodeId.from_string(node_id(idx, parent)), ua.QualifiedName(parent, idx)
                    )
                node_parent = folders[parent]
            variant_type = getattr(ua.VariantType, type_name)
            node = await node_parent.add_variable(
                ua.NodeId.from_string(node_id(idx, path)),
                ua.QualifiedName(leaf, idx),
                ua.Variant(initial, variant_type),
            )
            self._nodes[path] = (node, variant_type)

    async def _write(self, values: dict[str, Any]) -> None:
        from asyncua import ua

        server = self._server
        if server is None:
            raise RuntimeError("server stopped")
        for path, value in values.items():
            node, variant_type = self._nodes[path]
            await server.write_attribute_value(
                node.nodeid, ua.DataValue(ua.Variant(value, variant_type))
            )
