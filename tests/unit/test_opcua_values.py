"""The OPC UA output's values (pure) and its start-up errors, without a running server."""

from __future__ import annotations

import socket
from datetime import datetime, timezone

import pytest

from edge_agent.core.verdict import Outcome
from edge_agent.sinks.opcua_server import (
    NO_P_DEFECT,
    VARIABLES,
    OpcUaError,
    OpcUaVerdicts,
    node_id,
    node_values,
    opcua_values,
)
from edge_agent.sinks.outputs import OutputUnavailable, VerdictEvent

FAIL = VerdictEvent(41, 1_732_392_000.25, Outcome.FAIL, "scratch", 0.97, 8.4, "widget@1.2.0")
ERROR = VerdictEvent(42, 1_732_392_000.5, Outcome.ERROR, "", None, 0.1, "widget@1.2.0", "bad")


def test_every_documented_variable_gets_a_value() -> None:
    values = node_values(opcua_values(FAIL, {"pass": 5, "fail": 2}, drifting=True))
    assert set(values) == {path for path, _, _ in VARIABLES}
    assert values["LastVerdict.Outcome"] == "fail"
    assert values["LastVerdict.FrameId"] == 41
    assert values["LastVerdict.Timestamp"] == datetime(2024, 11, 23, 20, 0, 0, 250000, timezone.utc)
    assert values["Counters.Total"] == 7 and values["Counters.Uncertain"] == 0
    assert values["Drifting"] is True and values["Model"] == "widget@1.2.0"


def test_an_error_verdict_has_the_sentinel_p_defect() -> None:
    values = node_values(opcua_values(ERROR, {}, drifting=False))
    assert values["LastVerdict.PDefect"] == NO_P_DEFECT
    assert values["LastVerdict.Label"] == ""


def test_node_ids_are_strings_under_edge_agent() -> None:
    assert node_id(2, "Counters.Fail") == "ns=2;s=EdgeAgent.Counters.Fail"
    assert node_id(3, "") == "ns=3;s=EdgeAgent"


def test_a_port_in_use_is_refused_at_start_with_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = OpcUaVerdicts("127.0.0.1", port, counts=dict, drifting=lambda: False)
        with pytest.raises(OpcUaError, match=f"127.0.0.1:{port}"):
            server.start()
        server.close()


def test_verdicts_before_the_server_listens_are_unavailable_not_queued() -> None:
    server = OpcUaVerdicts("127.0.0.1", 1, counts=dict, drifting=lambda: False)
    with pytest.raises(OutputUnavailable, match="not listening"):
        server.emit(FAIL)
