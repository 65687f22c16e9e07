"""scripts/mosquitto/acl says exactly what ARCHITECTURE.md's broker ACL says, in the
topic names of edge_agent.protocol.topics (a real broker runs it in
tests/integration/test_broker_acl.py)."""

from __future__ import annotations

from pathlib import Path

from edge_agent.protocol import topics
from fleet_server.enroll import SERVER_ACCOUNT

ACL = Path(__file__).resolve().parents[2] / "scripts" / "mosquitto" / "acl"


def rules() -> dict[str, set[tuple[str, str]]]:
    """Per ``user NAME`` (``*`` for patterns, which apply to everyone): (access, topic)."""
    out: dict[str, set[tuple[str, str]]] = {}
    user = ""
    for raw in ACL.read_text(encoding="utf-8").splitlines():
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = words[1]
        elif words[0] == "topic":
            out.setdefault(user, set()).add((words[1], words[2]))
        elif words[0] == "pattern":
            out.setdefault("*", set()).add((words[1], words[2]))
        else:
            raise AssertionError(f"{ACL}: unexpected line {raw!r}")
    return out


def test_acl_matches_the_topic_layout() -> None:
    acl = rules()
    # Anonymous clients (no "user" line yet) get nothing; the broker refuses them anyway.
    assert set(acl) == {SERVER_ACCOUNT, "*"}
    assert acl["*"] == {
        ("write", topics.state("X").replace("/X/", "/%u/")),
        ("write", topics.telemetry("X").replace("/X/", "/%u/")),
        ("write", topics.events("X").replace("/X/", "/%u/")),
        ("write", topics.fetch("X").replace("/X/", "/%u/")),
        ("read", topics.data("X").replace("/X/", "/%u/")),
        ("read", topics.NOTIFY),
    }
    assert acl[SERVER_ACCOUNT] == {
        ("read", topics.device_filter("state")),
        ("read", topics.device_filter("telemetry")),
        ("read", topics.device_filter("events")),
        ("read", topics.device_filter("fetch")),
        ("write", topics.device_filter("data")),
        ("readwrite", topics.NOTIFY),
    }
