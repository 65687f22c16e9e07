"""One structured line per event: JSON when not on a terminal (journald), text otherwise.

Call sites log a short message and name the event and its fields in ``extra``:
``log.warning("camera lost", extra={"event": "camera_lost", "target": url})``.
The JSON formatter writes ``ts``, ``level``, ``logger``, ``event``, ``msg`` and every
extra field; the text formatter appends the fields as ``key=value``.

Under systemd, stderr is a stream to journald (``$JOURNAL_STREAM`` names it). Each line
then starts with its syslog priority (``<4>`` for a warning, as ``sd-daemon(3)``
describes), which journald strips and stores, so ``journalctl -p warning`` works.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TextIO

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


# syslog priorities of the logging levels, for journald's "<N>" line prefix.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def priority_of(levelno: int) -> int:
    """The syslog priority for a logging level (levels in between round to the lower)."""
    for level, priority in _PRIORITY.items():
        if levelno >= level:
            return priority
    return 7


def is_journal(stream: TextIO, journal_stream: str | None) -> bool:
    """Whether ``stream`` is the journald stream named by ``$JOURNAL_STREAM``
    (``DEVICE:INODE``); a stream that was redirected since is not."""
    if not journal_stream:
        return False
    dev, _, ino = journal_stream.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        # No file descriptor (e.g. io.StringIO), or a malformed variable: not journald.
        return False


class JsonFormatter(logging.Formatter):
    """One JSON object per record; with ``journal`` prefixed by ``<priority>``."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        text = json.dumps(line, default=str)
        if self._journal:
            return f"<{priority_of(record.levelno)}>{text}"
        return text


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields(record)
        fields.pop("event", None)
        if fields:
            text += "  " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def setup_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure the root logger. ``fmt``: ``auto`` (JSON unless ``stream`` is a tty),
    ``json`` or ``text``."""
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    handler = logging.StreamHandler(out)
    journal = is_journal(out, os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(JsonFormatter(journal) if use_json else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
