"""``[log] format = "auto"``: text on a terminal, JSON otherwise, and on journald's
stream (``$JOURNAL_STREAM``) each JSON line prefixed with its syslog priority."""

from __future__ import annotations

import json
import logging
import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.logs import is_journal, priority_of, setup_logging


@pytest.fixture(autouse=True)
def keep_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _log_two_events() -> None:
    log = logging.getLogger("edge_agent.test")
    log.info("agent started", extra={"event": "started", "device": "d1"})
    log.warning("camera lost", extra={"event": "camera_lost", "target": "/dev/video0"})
    for h in logging.getLogger().handlers:
        h.flush()


def test_priorities() -> None:
    assert [priority_of(n) for n in (50, 40, 30, 25, 20, 10, 5)] == [2, 3, 4, 6, 6, 7, 7]


def test_journald_stream_gets_priority_prefixed_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging("auto", "info", stream)
        _log_two_events()
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<4>"]
    started, lost = (json.loads(line[3:]) for line in lines)
    assert started["event"] == "started" and started["level"] == "info"
    assert lost == {**lost, "event": "camera_lost", "target": "/dev/video0", "level": "warning"}


def test_other_file_gets_plain_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # JOURNAL_STREAM inherited, but stderr was redirected to a file since.
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    path = tmp_path / "log"
    with path.open("w") as stream:
        assert not is_journal(stream, os.environ["JOURNAL_STREAM"])
        setup_logging("auto", "info", stream)
        _log_two_events()
    events = [json.loads(line)["event"] for line in path.read_text().splitlines()]
    assert events == ["started", "camera_lost"]


def test_terminal_gets_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w") as tty:
            setup_logging("auto", "info", tty)
            _log_two_events()
            text = ""
            while "camera lost" not in text:  # a pty hands out one line per read
                ready, _, _ = select.select([master], [], [], 5.0)
                assert ready, f"nothing more on the terminal after {text!r}"
                text += os.read(master, 4096).decode()
    finally:
        os.close(master)
    assert "agent started  device=d1" in text
    assert "camera lost  target=/dev/video0" in text
    assert "{" not in text


def test_malformed_journal_stream_is_ignored(tmp_path: Path) -> None:
    with (tmp_path / "f").open("w") as stream:
        assert not is_journal(stream, "not-a-device")
        assert not is_journal(stream, "")
        assert not is_journal(stream, None)
