"""The REST API's rules without a server: config, token file, client addresses, evidence
paths, result rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edge_agent.config import AgentConfig, ConfigError, load_config
from edge_agent.sinks.api_backend import (
    ResultRow,
    ResultsReader,
    evidence_file,
    is_local_client,
    row_document,
)
from edge_agent.sinks.rest_api import RestApiError, read_token
from tests.integration.reference import ONNX_BUNDLE


def _config(tmp_path: Path, rest: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
[device]
id = "cam-1"
[source]
url = "synthetic:"
[model]
bundle = "{ONNX_BUNDLE}"
[outputs.rest]
{rest}
"""
    )
    return path


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:8080", "192.168.1.20:8080", "[::]:8080", "plc-net:8080"]
)
def test_an_address_off_loopback_needs_a_token(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match=r"\[outputs\] rest: .*token_file is required"):
        load_config(_config(tmp_path, f'listen = "{listen}"'))


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "localhost:8080", "[::1]:8080"])
def test_loopback_needs_no_token(tmp_path: Path, listen: str) -> None:
    cfg = load_config(_config(tmp_path, f'listen = "{listen}"'))
    assert cfg.outputs.rest is not None and cfg.outputs.rest.token_file is None


def test_the_token_file_is_resolved_against_the_config(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, 'listen = "0.0.0.0:8080"\ntoken_file = "api.token"'))
    assert isinstance(cfg, AgentConfig) and cfg.outputs.rest is not None
    assert cfg.outputs.rest.token_file == tmp_path / "api.token"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file"), ("", ">= 16"), ("short\n", ">= 16")],
    ids=["missing", "empty", "short"],
)
def test_a_bad_token_file_is_named(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "api.token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RestApiError, match=message) as info:
        read_token(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("10.1.2.3", True),
        ("192.168.0.9", True),
        ("172.16.5.5", True),
        ("fd00::1", True),
        ("::ffff:192.168.1.1", True),
        ("169.254.1.1", True),
        ("8.8.8.8", False),
        ("2001:4860::8888", False),
        ("::ffff:8.8.8.8", False),
        ("testclient", False),
        ("", False),
        (None, False),
    ],
)
def test_local_clients(host: str | None, local: bool) -> None:
    assert is_local_client(host) is local


def test_an_evidence_path_cannot_leave_the_root(tmp_path: Path) -> None:
    root = tmp_path / "evidence"
    (root / "fail" / "20260101").mkdir(parents=True)
    image = root / "fail" / "20260101" / "1-2.jpg"
    image.write_bytes(b"\xff\xd8")
    (tmp_path / "secret.txt").write_text("no")
    assert evidence_file(root, "fail/20260101/1-2.jpg") == image.resolve()
    assert evidence_file(root, "../secret.txt") is None
    assert evidence_file(root, "fail/20260101/missing.jpg") is None


def test_a_row_links_its_evidence_only_when_it_has_one() -> None:
    row = ResultRow(7, 3, 1.5, "synthetic:", "m@1", None, "error", 0.5, "not an image", None)
    doc = row_document(row)
    assert doc["evidence"] is None and doc["p"] is None and doc["outcome"] == "error"
    with_image = ResultRow(8, 4, 1.6, "synthetic:", "m@1", 0.91, "fail", 3.0, None, "fail/x.jpg")
    assert row_document(with_image)["evidence"] == "/v1/evidence/8"


def results_db(path: Path) -> None:
    """A results.db with five fail rows (ids 1-5, ts 100-104), each with an image path."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE results (id INTEGER PRIMARY KEY, frame_id INTEGER, ts REAL,"
            " source TEXT, source_key TEXT, model TEXT, p_defect REAL, verdict TEXT,"
            " latency_ms REAL, error TEXT, evidence TEXT)"
        )
        for i in range(5):
            conn.execute(
                "INSERT INTO results VALUES (?, ?, ?, 's', NULL, 'm@1', 0.9, 'fail', 1.0, NULL, ?)",
                (i + 1, i, 100.0 + i, f"fail/d/{i}.jpg"),
            )


def test_results_are_bounded_and_paged_by_since(tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    results_db(db)
    reader = ResultsReader(db)
    assert [r.frame_id for r in reader.recent(None, 2)] == [3, 4]  # newest, oldest first
    assert [r.frame_id for r in reader.recent(101.0, 2)] == [2, 3]  # after since
    assert reader.evidence_of(2) == "fail/d/1.jpg"
    assert reader.evidence_of(99) is None
