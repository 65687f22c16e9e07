"""Builds the line outputs named in ``[outputs]`` and ``[metrics]`` (``service.py`` reads
the config).

    inspections -> LineOutputs -> QueuedOutput(RejectScheduler -> GPIO line)   first
                               -> QueuedOutput(MqttVerdicts -> plant broker)
                               -> QueuedOutput(OpcUaVerdicts -> OPC UA server thread)
                               -> LineStats (counts for status, metrics, OPC UA)
    REST API (uvicorn thread), metrics server  -> AgentView (read-only)

Each output runs behind its own bounded queue on its own thread, so a slow or dead output
drops (counted) instead of slowing inspection; the reject is offered first. The REST API
and the metrics server only read the agent, on their own threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.config import (
    ConfigError,
    MetricsSection,
    OutputsSection,
    StorageSection,
    split_host_port,
)
from edge_agent.core.verdict import Outcome
from edge_agent.inspect import Inspector
from edge_agent.metrics import AgentView, MetricsServer
from edge_agent.pipeline import Inspection, Pipeline
from edge_agent.sinks.gpio import GpiodRejectLine, RejectLine, RejectScheduler, SimulatedRejectLine
from edge_agent.sinks.mqtt_verdicts import MqttVerdicts, MqttVerdictSettings
from edge_agent.sinks.outputs import LineOutputError, Outputs, QueuedOutput
from edge_agent.transport import TlsFiles

if TYPE_CHECKING:
    from edge_agent.sinks.api_backend import ApiInspector
    from edge_agent.sinks.rest_api import RestServer
    from edge_agent.update.manager import UpdateManager

log = logging.getLogger("edge_agent.outputs")

SIMULATED_CHIP = "simulated"
REJECT_QUEUE = 1024


class LineOutputs:
    """The agent's outputs: ``offer_inspection`` per verdict, ``close`` at the end.

    ``view`` is what the REST API, the metrics and OPC UA read; ``attach`` gives it the
    pipeline and update manager once they exist.
    """

    def __init__(
        self,
        queued: list[QueuedOutput],
        reject: RejectScheduler | None,
        view: AgentView | None = None,
    ) -> None:
        self.queued = tuple(queued)
        self.reject = reject
        self.fanout = Outputs(queued)
        self.view = view
        self.rest: RestServer | None = None
        self.api_inspector: ApiInspector | None = None
        self.metrics_server: MetricsServer | None = None
        if view is not None:
            view.outputs = self.queued

    def offer_inspection(self, inspection: Inspection) -> None:
        """Returns at once: each output has its own queue and thread."""
        self.fanout.offer_inspection(inspection)  # first: the reject has a deadline
        if self.view is not None:
            verdict = inspection.verdict
            self.view.stats.add(verdict.outcome.value, verdict.latency_ms)

    def attach(self, pipeline: Pipeline, updates: UpdateManager | None) -> None:
        """The line is built: status and metrics read it from now on, and the REST API
        opens its own inspector on the line's model."""
        if self.view is not None:
            self.view.attach(pipeline, updates)
        if self.api_inspector is not None:
            self.api_inspector.warm_up()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the servers, drain and close every output (within ``timeout_s`` in all);
        log the counters."""
        if self.rest is not None:
            self.rest.close()
        if self.api_inspector is not None:
            self.api_inspector.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        drained = self.fanout.close(timeout_s)
        for member in self.queued:
            extra: dict[str, object] = asdict(member.counters)
            if member.output is self.reject and self.reject is not None:
                extra.update({f"reject_{k}": v for k, v in asdict(self.reject.counters).items()})
            log.info(
                "line output closed",
                extra={
                    "event": "output_closed",
                    "output": member.name,
                    "drained": drained.get(member.name, False),
                    **extra,
                },
            )


def open_outputs(
    section: OutputsSection,
    device_id: str,
    *,
    metrics: MetricsSection | None = None,
    state_dir: Path | None = None,
    open_model: Callable[[Path], Inspector] | None = None,
) -> LineOutputs | None:
    """The configured outputs and servers, started; None when none is configured.

    Args:
        section, metrics: the ``[outputs]`` and ``[metrics]`` config.
        device_id: names the MQTT client and the status.
        state_dir: where results.db, evidence and drift.json are (REST, metrics, OPC UA).
        open_model: opens a bundle as the line does (for ``POST /v1/inspect``).

    Raises:
        ConfigError: an output cannot start; the message names its section and why
            (GPIO chip or line, an address in use, an unreadable token file).
    """
    metrics = metrics or MetricsSection()
    local = section.rest is not None or section.opcua is not None or metrics.listen is not None
    if local and state_dir is None:
        raise ValueError("state_dir is needed for [outputs.rest], [outputs.opcua], [metrics]")
    view = AgentView(device_id, state_dir) if local and state_dir is not None else None
    members: list[QueuedOutput] = []
    outputs: LineOutputs | None = None
    try:
        scheduler = _open_reject(section, members)
        _open_mqtt(section, device_id, members)
        if view is not None and section.opcua is not None:
            _open_opcua(section, view, members)
        if not members and view is None:
            return None
        outputs = LineOutputs(members, scheduler, view)
        if view is not None and section.rest is not None:
            _open_rest(section, view, outputs, open_model)
        if view is not None and metrics.listen is not None:
            host, port = _bind_address(metrics.listen)
            try:
                outputs.metrics_server = MetricsServer(view, host, port)
            except OSError as e:
                raise ConfigError(f"[metrics] cannot listen on {metrics.listen}: {e}") from e
    except BaseException:
        # Started threads and sockets must not outlive a refused start.
        if outputs is not None:
            outputs.close(timeout_s=1.0)
        else:
            Outputs(members).close(timeout=1.0)
        raise
    return outputs


def _bind_address(listen: str) -> tuple[str, int]:
    """``host:port`` of a listen key as a socket address (``[::1]:80`` -> ``::1``, 80)."""
    host, port = split_host_port(listen)
    return host.strip("[]"), port


def _open_reject(section: OutputsSection, members: list[QueuedOutput]) -> RejectScheduler | None:
    r = section.reject
    if r is None:
        return None
    line: RejectLine
    try:
        if r.chip == SIMULATED_CHIP:
            line = SimulatedRejectLine()
        else:
            line = GpiodRejectLine(r.chip, r.line, active_low=r.active_low)
    except LineOutputError as e:
        raise ConfigError(f"[outputs.reject] {e}") from e
    scheduler = RejectScheduler(
        line,
        delay_ms=r.delay_ms,
        pulse_ms=r.pulse_ms,
        outcomes=tuple(Outcome(o) for o in r.outcomes),
        max_late_ms=r.max_late_ms,
    )
    members.append(QueuedOutput(scheduler, queue_size=REJECT_QUEUE, priority=True))
    return scheduler


def _open_mqtt(section: OutputsSection, device_id: str, members: list[QueuedOutput]) -> None:
    m = section.mqtt
    if m is None:
        return
    host, port = split_host_port(m.broker)
    tls = None
    if m.tls_ca is not None and m.tls_cert is not None and m.tls_key is not None:
        tls = TlsFiles(m.tls_ca, m.tls_cert, m.tls_key)
    verdicts = MqttVerdicts(
        MqttVerdictSettings(
            host=host,
            port=port,
            client_id=m.client_id or f"{device_id}-verdicts",
            topic=m.topic,
            qos=m.qos,
            tls=tls,
        )
    )
    verdicts.start()
    members.append(QueuedOutput(verdicts, queue_size=m.queue))


def _open_opcua(section: OutputsSection, view: AgentView, members: list[QueuedOutput]) -> None:
    from edge_agent.sinks.opcua_server import OpcUaError, OpcUaVerdicts

    assert section.opcua is not None
    host, port = _bind_address(section.opcua.listen)
    server = OpcUaVerdicts(
        host,
        port,
        counts=lambda: view.stats.snapshot().verdicts,
        drifting=lambda: view.drift.read().drifting,
    )
    try:
        server.start()  # returns at once: the line does not wait for the address space
    except OpcUaError as e:
        raise ConfigError(f"[outputs.opcua] {e}") from e
    members.append(QueuedOutput(server, queue_size=section.opcua.queue))


def _open_rest(
    section: OutputsSection,
    view: AgentView,
    outputs: LineOutputs,
    open_model: Callable[[Path], Inspector] | None,
) -> None:
    rest = section.rest
    assert rest is not None
    try:
        from edge_agent.sinks import rest_api
        from edge_agent.sinks.api_backend import ApiInspector, ResultsReader
    except ImportError as e:
        raise ConfigError(
            f"[outputs.rest] needs fastapi and uvicorn (pip install 'edgefleet[outputs,server]'):"
            f" {e}"
        ) from e

    def line_bundle() -> Path | None:
        pipeline = view.pipeline
        return None if pipeline is None else pipeline.inspector.bundle.path

    host, port = _bind_address(rest.listen)
    storage = StorageSection(state_dir=view.state_dir)
    try:
        token = None if rest.token_file is None else rest_api.read_token(rest.token_file)
        settings = rest_api.RestSettings(
            host=host,
            port=port,
            token=token,
            max_image_bytes=int(rest.max_image_mb * 1024 * 1024),
            results_limit=rest.results_limit,
        )
        inspector = ApiInspector(open_model or Inspector.open, line_bundle, view)
        outputs.api_inspector = inspector
        app = rest_api.build_app(
            settings, view, inspector, ResultsReader(storage.results_db), storage.evidence_dir
        )
        outputs.rest = rest_api.RestServer(app, host, port)
    except rest_api.RestApiError as e:
        raise ConfigError(str(e)) from e
