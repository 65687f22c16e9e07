"""`edge-agent run` as a real process: hot folder, bad files, SIGTERM, SIGKILL, full disk."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from edge_agent.cli import main
from edge_agent.core.synthetic import LineConditions, render_item
from tests.integration.agent_proc import start_agent
from tests.integration.reference import ONNX_BUNDLE, UNSEEN_SEED
from tests.tmpfs import small_tmpfs


def _config(
    tmp_path: Path, source: str, extra_source: str = "", storage: str = "", log: str = ""
) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
[device]
id = "test-cam"
profile = "x86-generic"

[source]
url = "{source}"
{extra_source}

[model]
bundle = "{ONNX_BUNDLE}"

[storage]
state_dir = "{tmp_path / "state"}"
evidence_pass_every = 10
{storage}

[log]
format = "json"
summary_interval_s = 0.5
{log}
"""
    )
    return path


def _fill_inbox(inbox: Path, count: int, start: int = 0) -> list[str]:
    inbox.mkdir(exist_ok=True)
    names = []
    for i in range(start, start + count):
        image = render_item(UNSEEN_SEED, i, (320, 240), LineConditions(defect_rate=0.3)).image
        name = f"item-{i:05d}.jpg"
        tmp = inbox / f".{name}.part"
        tmp.write_bytes(cv2.imencode(".jpg", image)[1].tobytes())
        tmp.rename(inbox / name)
        names.append(name)
    return names


def _rows(db: Path) -> list[tuple[str | None, str]]:
    """Committed results; none while the agent has not yet created its schema."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as conn:
            return list(conn.execute("SELECT source_key, verdict FROM results ORDER BY id"))
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise


def _wait_for(predicate: object, timeout: float) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s")


def _events(stderr: str) -> Iterator[dict[str, object]]:
    for line in stderr.splitlines():
        if line.startswith("{"):
            yield json.loads(line)


def _inbox_empty(inbox: Path) -> bool:
    return not any(p.is_file() for p in inbox.iterdir())


def test_hot_folder_with_bad_files_keeps_running(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    good = _fill_inbox(inbox, 12)
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": (inbox / good[0]).read_bytes()[:500],
        "text.png": b"hello, not a picture",
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + b"\x00" * 64 + b"\xff\xd9",
    }
    for name, data in bad.items():
        (inbox / name).write_bytes(data)
    proc = start_agent(_config(tmp_path, f"folder:{inbox}", "settle_s = 0.2"))
    try:
        _wait_for(lambda: _inbox_empty(inbox), 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert sorted(p.name for p in (inbox / "error").glob("*.*g")) == sorted(bad)
    assert sorted(p.name for p in (inbox / "done").iterdir()) == sorted(good)
    rows = _rows(tmp_path / "state" / "results.db")
    assert len(rows) == len(good) + len(bad)
    assert sum(v == "error" for _, v in rows) == len(bad)
    events = list(_events(stderr))
    assert any(e.get("event") == "summary" for e in events)
    assert events[-1]["event"] == "stopped"


def test_sigterm_under_load_drains_in_flight_frames(tmp_path: Path) -> None:
    config = _config(tmp_path, "synthetic:", 'size = "640x480"')
    proc = start_agent(config)
    db = tmp_path / "state" / "results.db"
    _wait_for(lambda: len(_rows(db)) > 50, 60)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10, "SIGTERM must stop the agent within bounded time"
    assert proc.returncode == 0, stderr
    stopped = [e for e in _events(stderr) if e.get("event") == "stopped"]
    assert len(stopped) == 1
    # Every frame inspected before the stop is in results.db: nothing in flight was lost.
    assert stopped[0]["inspected"] == len(_rows(db))


def test_sigkill_under_load_then_restart_processes_every_file_once(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    names = _fill_inbox(inbox, 150)
    config = _config(tmp_path, f"folder:{inbox}", "settle_s = 0.1")
    db = tmp_path / "state" / "results.db"
    proc = start_agent(config)
    _wait_for(lambda: len(_rows(db)) >= 40, 60)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    names += _fill_inbox(inbox, 20, start=500)
    proc = start_agent(config)
    try:
        _wait_for(lambda: _inbox_empty(inbox), 90)
        _wait_for(lambda: len(_rows(db)) >= len(names), 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    rows = _rows(db)
    keys = [k for k, _ in rows]
    assert len(keys) == len(set(keys)) == len(names), "each file inspected exactly once"
    assert sorted(k.split(":")[0] for k in keys if k) == sorted(names)
    assert sorted(p.name for p in (inbox / "done").iterdir()) == sorted(names)


def test_full_disk_for_evidence_never_stops_inspection(tmp_path: Path) -> None:
    state = tmp_path / "state"
    evidence = state / "evidence"
    with small_tmpfs(evidence, "256k"):
        config = _config(
            tmp_path,
            "synthetic:",
            'size = "1280x960"\ncount = 300\ndefect_rate = 0.5',
            "evidence_quota_mb = 100",
        )
        proc = start_agent(config)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert len(_rows(state / "results.db")) == 300
        disk_errors = [e for e in _events(stderr) if e.get("event") == "evidence_disabled"]
        assert len(disk_errors) == 1, "one clear log line, not one per frame"


def test_check_prints_what_would_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert main(["check", "--config", str(_config(tmp_path, f"folder:{inbox}"))]) == 0
    out = capsys.readouterr().out
    for word in ("model", "runtime", "CPUExecutionProvider", "hot folder", "results", "quota"):
        assert word in out
    assert "golden samples match" in out
    assert "updates     off" in out


def test_check_names_fleet_settings_and_a_missing_trust_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, "synthetic:")
    root = tmp_path / "root.json"
    fleet = f'\n[fleet]\nbroker = "127.0.0.1:1883"\nroot_metadata = "{root}"\n'
    config.write_text(config.read_text() + fleet)
    assert main(["check", "--config", str(config)]) == 1
    assert f"[fleet] root_metadata: {root} is not a file" in capsys.readouterr().out
    root.write_text("{}")
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "updates     from 127.0.0.1:1883" in out and "p99 <= 50 ms" in out


def test_check_reports_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(
        tmp_path,
        f"folder:{tmp_path / 'missing-inbox'}",
        storage="evidence_quota_mb = 100000000",
    )
    text = config.read_text().replace(str(ONNX_BUNDLE), str(tmp_path / "no-bundle"))
    config.write_text(text)
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "missing-inbox does not exist" in out
    assert "no-bundle" in out
    assert "exceeds free space" in out
    assert "3 problem(s)" in out


def test_run_with_bad_config_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, "synthetic:", "brigthness = 0.5")
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "[source] brigthness" in err and str(config) in err
