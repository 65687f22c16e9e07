"""The retained ``notify`` message: "timestamp.json version N is published".

Wire format (v1): compact JSON, exactly one key, UTF-8, at most ``MAX_NOTIFY_BYTES``::

    {"timestamp_version":N}

``N`` is the published ``timestamp.json`` version (an integer >= 1). The message is only a
hint to refresh now instead of at the next poll: it is unsigned, so a device never trusts
the number, it only runs its TUF refresh (which verifies everything) when ``N`` is above
the timestamp version it already trusts.

Pure and stdlib-only; the fleet server encodes, the device decodes.
"""

from __future__ import annotations

import json
from typing import Final

MAX_NOTIFY_BYTES: Final = 256
_KEY: Final = "timestamp_version"


class NotifyError(ValueError):
    """A notify payload is not ``{"timestamp_version":N}`` with an integer ``N >= 1``."""


def encode_notify(timestamp_version: int) -> bytes:
    """The payload announcing ``timestamp_version``.

    Raises:
        ValueError: ``timestamp_version`` is not an integer >= 1 (a programming error).
    """
    if isinstance(timestamp_version, bool) or not isinstance(timestamp_version, int):
        raise ValueError(f"timestamp version must be an int, got {timestamp_version!r}")
    if timestamp_version < 1:
        raise ValueError(f"timestamp version must be >= 1, got {timestamp_version}")
    return json.dumps({_KEY: timestamp_version}, separators=(",", ":")).encode()


def decode_notify(payload: bytes) -> int:
    """The timestamp version announced by ``payload``.

    Raises:
        NotifyError: too long, not UTF-8 JSON, not an object with exactly the one key, or
            a version that is not an integer >= 1.
    """
    if len(payload) > MAX_NOTIFY_BYTES:
        raise NotifyError(f"notify payload of {len(payload)} bytes (max {MAX_NOTIFY_BYTES})")
    try:
        document = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise NotifyError(f"notify payload is not JSON: {e}") from e
    if not isinstance(document, dict) or set(document) != {_KEY}:
        raise NotifyError(f"notify payload must be an object with exactly the key {_KEY!r}")
    version = document[_KEY]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise NotifyError(f"{_KEY} must be an integer >= 1, got {version!r}")
    return version
