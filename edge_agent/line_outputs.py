"""Builds the line outputs named in ``[outputs]`` (``service.py`` reads the config).

    inspections -> Outputs -> QueuedOutput(RejectScheduler -> GPIO line)   first
                           -> QueuedOutput(MqttVerdicts -> plant broker)

Each output runs behind its own bounded queue on its own thread, so a slow or dead output
drops (counted) instead of slowing inspection; the reject is offered first.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from edge_agent.config import OutputsSection, split_host_port
from edge_agent.core.verdict import Outcome
from edge_agent.pipeline import Inspection
from edge_agent.sinks.gpio import GpiodRejectLine, RejectLine, RejectScheduler, SimulatedRejectLine
from edge_agent.sinks.mqtt_verdicts import MqttVerdicts, MqttVerdictSettings
from edge_agent.sinks.outputs import Outputs, QueuedOutput
from edge_agent.transport import TlsFiles

log = logging.getLogger("edge_agent.outputs")

SIMULATED_CHIP = "simulated"
REJECT_QUEUE = 1024


class LineOutputs:
    """The agent's outputs: ``offer_inspection`` per verdict, ``close`` at the end."""

    def __init__(self, queued: list[QueuedOutput], reject: RejectScheduler | None) -> None:
        self.queued = tuple(queued)
        self.reject = reject
        self.fanout = Outputs(queued)

    def offer_inspection(self, inspection: Inspection) -> None:
        """Returns at once: each output has its own queue and thread."""
        self.fanout.offer_inspection(inspection)

    def close(self, timeout_s: float = 5.0) -> None:
        """Drain and close every output (within ``timeout_s`` in all); log the counters."""
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


def open_outputs(section: OutputsSection, device_id: str) -> LineOutputs | None:
    """The configured outputs, started; None when none is configured.

    Raises:
        RejectLineError: the GPIO chip or line cannot be opened (named).
    """
    members: list[QueuedOutput] = []
    scheduler: RejectScheduler | None = None
    if section.reject is not None:
        r = section.reject
        line: RejectLine
        if r.chip == SIMULATED_CHIP:
            line = SimulatedRejectLine()
        else:
            line = GpiodRejectLine(r.chip, r.line, active_low=r.active_low)
        scheduler = RejectScheduler(
            line,
            delay_ms=r.delay_ms,
            pulse_ms=r.pulse_ms,
            outcomes=tuple(Outcome(o) for o in r.outcomes),
            max_late_ms=r.max_late_ms,
        )
        members.append(QueuedOutput(scheduler, queue_size=REJECT_QUEUE, priority=True))
    if section.mqtt is not None:
        m = section.mqtt
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
    if not members:
        return None
    return LineOutputs(members, scheduler)
