"""Wire format of fetch requests (device -> server) and answers (server -> device).

Request, on ``topics.fetch(id)``: compact UTF-8 JSON
``{"id": "<hex>", "path": "metadata/timestamp.json", "offset": 0, "length": 65536}``.

Answer, on ``topics.data(id)``::

    b"EFD1" | header length (uint16, big-endian) | JSON header | chunk bytes

with the JSON header ``{"id": "<hex>", "offset": int, "total": int, "status": "ok" |
"not_found" | "bad_request"}``. ``total`` is the whole file's length (0 unless "ok").

Pure and stdlib-only. Every decoder raises only `WireError` on malformed input.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Final, Literal, get_args

CHUNK_SIZE: Final = 64 * 1024
MAGIC: Final = b"EFD1"
MAX_REQUEST_BYTES: Final = 1024
MAX_HEADER_BYTES: Final = 1024
MAX_PATH_CHARS: Final = 512
MAX_TARGET_SEGMENTS: Final = 8

Status = Literal["ok", "not_found", "bad_request"]
STATUSES: Final[tuple[Status, ...]] = get_args(Status)

_HEADER_LEN: Final = struct.Struct(">H")
_ID_RE: Final = re.compile(r"[0-9a-f]{1,64}")
# No leading dot: rules out ".", ".." and hidden files in one go.
_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}")
_REQUEST_KEYS: Final = frozenset({"id", "path", "offset", "length"})
_ANSWER_KEYS: Final = frozenset({"id", "offset", "total", "status"})


class WireError(ValueError):
    """Malformed request or answer. `request_id` is the correlation id if it was readable."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """Ask for ``length`` bytes of ``path`` starting at ``offset``."""

    id: str
    path: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class FetchAnswer:
    """One chunk of a file (``data``) starting at ``offset``, or an error status."""

    id: str
    offset: int
    total: int
    status: Status
    data: bytes = b""


def validate_path(path: str) -> str:
    """Return `path` unchanged if it is ``metadata/<name>.json`` or ``targets/<segments>``.

    Segments are 1-128 characters of ``A-Z a-z 0-9 . _ + -`` not starting with ``.``.

    Raises:
        WireError: anything else (``..``, absolute, empty segments, other roots, ...).
    """
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_CHARS:
        raise WireError(f"invalid path: {path!r}")
    parts = path.split("/")
    if not all(_SEGMENT_RE.fullmatch(part) for part in parts[1:]):
        raise WireError(f"unsafe path: {path!r}")
    if parts[0] == "metadata" and len(parts) == 2 and parts[1].endswith(".json"):
        return path
    if parts[0] == "targets" and 2 <= len(parts) <= MAX_TARGET_SEGMENTS + 1:
        return path
    raise WireError(f"path outside metadata/*.json and targets/: {path!r}")


def _check_id(value: object) -> str:
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise WireError(f"invalid correlation id: {value!r}")
    return value


def _check_int(name: str, value: object, low: int, high: int | None, request_id: str) -> int:
    # bool is an int subclass; true/false is not a number on this wire.
    if type(value) is not int or value < low or (high is not None and value > high):
        raise WireError(f"invalid {name}: {value!r}", request_id)
    return value


def _load_object(raw: bytes, keys: frozenset[str]) -> dict[str, object]:
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WireError(f"not JSON: {e}") from e
    if not isinstance(document, dict):
        raise WireError("not a JSON object")
    request_id = document.get("id")
    known = request_id if isinstance(request_id, str) and _ID_RE.fullmatch(request_id) else None
    if set(document) != keys:
        raise WireError(f"expected keys {sorted(keys)}, got {sorted(document)}", known)
    return document


def encode_request(request: FetchRequest) -> bytes:
    """Compact JSON bytes of `request`.

    Raises:
        WireError: a field is out of range (a programming error on the device).
    """
    payload = json.dumps(
        {
            "id": request.id,
            "path": request.path,
            "offset": request.offset,
            "length": request.length,
        },
        separators=(",", ":"),
    ).encode()
    decode_request(payload)  # one set of rules for both directions
    return payload


def decode_request(payload: bytes) -> FetchRequest:
    """Parse and validate a request.

    Raises:
        WireError: oversize, not JSON, wrong keys, bad id/path, negative offset, length not
            in 1..CHUNK_SIZE. ``request_id`` is set when the id itself was valid.
    """
    if len(payload) > MAX_REQUEST_BYTES:
        raise WireError(f"request of {len(payload)} bytes is over {MAX_REQUEST_BYTES}")
    document = _load_object(payload, _REQUEST_KEYS)
    request_id = _check_id(document["id"])
    path = document["path"]
    if not isinstance(path, str):
        raise WireError(f"invalid path: {path!r}", request_id)
    try:
        validate_path(path)
    except WireError as e:
        raise WireError(str(e), request_id) from None
    offset = _check_int("offset", document["offset"], 0, None, request_id)
    length = _check_int("length", document["length"], 1, CHUNK_SIZE, request_id)
    return FetchRequest(request_id, path, offset, length)


def encode_answer(answer: FetchAnswer) -> bytes:
    """Magic, header length, JSON header, then the chunk bytes.

    Raises:
        WireError: invalid id, status or numbers, or more than CHUNK_SIZE bytes.
    """
    _check_id(answer.id)
    _check_int("offset", answer.offset, 0, None, answer.id)
    _check_int("total", answer.total, 0, None, answer.id)
    if answer.status not in STATUSES:
        raise WireError(f"invalid status: {answer.status!r}", answer.id)
    if len(answer.data) > CHUNK_SIZE:
        raise WireError(f"chunk of {len(answer.data)} bytes is over {CHUNK_SIZE}", answer.id)
    header = json.dumps(
        {"id": answer.id, "offset": answer.offset, "total": answer.total, "status": answer.status},
        separators=(",", ":"),
    ).encode()
    return MAGIC + _HEADER_LEN.pack(len(header)) + header + bytes(answer.data)


def decode_answer(payload: bytes) -> FetchAnswer:
    """Parse and validate an answer.

    Raises:
        WireError: truncated, bad magic, header length over MAX_HEADER_BYTES, bad JSON or
            fields, chunk over CHUNK_SIZE, or data with a non-"ok" status.
    """
    fixed = len(MAGIC) + _HEADER_LEN.size
    if len(payload) < fixed:
        raise WireError(f"answer of {len(payload)} bytes is truncated")
    if payload[: len(MAGIC)] != MAGIC:
        raise WireError("bad magic")
    (header_len,) = _HEADER_LEN.unpack_from(payload, len(MAGIC))
    if header_len > MAX_HEADER_BYTES:
        raise WireError(f"header of {header_len} bytes is over {MAX_HEADER_BYTES}")
    if len(payload) < fixed + header_len:
        raise WireError("truncated header")
    document = _load_object(payload[fixed : fixed + header_len], _ANSWER_KEYS)
    answer_id = _check_id(document["id"])
    offset = _check_int("offset", document["offset"], 0, None, answer_id)
    total = _check_int("total", document["total"], 0, None, answer_id)
    status = document["status"]
    data = payload[fixed + header_len :]
    if len(data) > CHUNK_SIZE:
        raise WireError(f"chunk of {len(data)} bytes is over {CHUNK_SIZE}", answer_id)
    for known in STATUSES:
        if status == known:
            if known != "ok" and data:
                raise WireError(f"{known} answer carries data", answer_id)
            return FetchAnswer(answer_id, offset, total, known, data)
    raise WireError(f"invalid status: {status!r}", answer_id)
