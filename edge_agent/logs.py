"""One structured line per event: JSON when not on a terminal (journald), text otherwise.

Call sites log a short message and name the event and its fields in ``extra``:
``log.warning("camera lost", extra={"event": "camera_lost", "target": url})``.
The JSON formatter writes ``ts``, ``level``, ``logger``, ``event``, ``msg`` and every
extra field; the text formatter appends the fields as ``key=value``.
"""

from __future__ import annotations

import json
import logging
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


class JsonFormatter(logging.Formatter):
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
        return json.dumps(line, default=str)


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
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
