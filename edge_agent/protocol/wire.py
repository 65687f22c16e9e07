"""What every compact-JSON message decoder checks first, in one place.

Pure and stdlib-only; raises only ``ValueError``.
"""

from __future__ import annotations

import json
from collections.abc import Set

MAX_TEXT = 96


def load_document(
    payload: bytes, *, what: str, max_bytes: int, keys: Set[str], version: int
) -> dict[str, object]:
    """The JSON object in ``payload``, after the checks every message shares.

    Raises:
        ValueError: over ``max_bytes``, not JSON, not an object, a key outside ``keys``
            (named), or ``v`` other than ``version``.
    """
    if len(payload) > max_bytes:
        raise ValueError(f"{what} of {len(payload)} bytes is over {max_bytes}")
    document = json.loads(payload)
    if not isinstance(document, dict):
        raise ValueError(f"{what}: not a JSON object")
    unknown = set(document) - keys
    if unknown:
        raise ValueError(f"unknown keys in {what}: {', '.join(sorted(unknown))}")
    if document.get("v") != version:
        raise ValueError(f"unsupported {what} version {document.get('v')!r}")
    return document


def text_field(value: object, where: str) -> str:
    """``value`` if it is a string of 1..MAX_TEXT characters; else ValueError naming it."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
        raise ValueError(f"{where} must be a string of 1..{MAX_TEXT} characters")
    return value
