"""The fetch wire format: exact bytes, round trips, and every malformed input refused."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.protocol.fetch_wire import (
    CHUNK_SIZE,
    MAGIC,
    FetchAnswer,
    FetchRequest,
    WireError,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
    validate_path,
)


def _header(document: object) -> bytes:
    raw = json.dumps(document).encode()
    return MAGIC + struct.pack(">H", len(raw)) + raw


def test_request_bytes_are_compact_json() -> None:
    request = FetchRequest("ab12", "metadata/timestamp.json", 0, CHUNK_SIZE)
    payload = encode_request(request)
    assert payload == (b'{"id":"ab12","path":"metadata/timestamp.json","offset":0,"length":65536}')
    assert decode_request(payload) == request


def test_answer_bytes_and_round_trip() -> None:
    answer = FetchAnswer("ff", 65536, 70000, "ok", b"\x00chunk")
    payload = encode_answer(answer)
    header = b'{"id":"ff","offset":65536,"total":70000,"status":"ok"}'
    assert payload == b"EFD1" + struct.pack(">H", len(header)) + header + b"\x00chunk"
    assert decode_answer(payload) == answer


@pytest.mark.parametrize("status", ["not_found", "bad_request"])
def test_error_answers_round_trip(status: str) -> None:
    answer = FetchAnswer("01", 0, 0, status)  # type: ignore[arg-type]
    assert decode_answer(encode_answer(answer)) == answer


def test_full_chunk_round_trips() -> None:
    answer = FetchAnswer("1", 0, CHUNK_SIZE, "ok", bytes(CHUNK_SIZE))
    assert decode_answer(encode_answer(answer)) == answer


GOOD_REQUEST = {"id": "a1", "path": "targets/models/x.tar", "offset": 0, "length": 10}


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"{", id="bad-json"),
        pytest.param(b"[]", id="not-object"),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="deep-nesting-oversize"),
        pytest.param(json.dumps({**GOOD_REQUEST, "x": 1}).encode(), id="extra-key"),
        pytest.param(json.dumps({"id": "a1", "path": "metadata/a.json"}).encode(), id="missing"),
        pytest.param(json.dumps({**GOOD_REQUEST, "id": "XYZ"}).encode(), id="bad-id"),
        pytest.param(json.dumps({**GOOD_REQUEST, "id": 7}).encode(), id="int-id"),
        pytest.param(json.dumps({**GOOD_REQUEST, "offset": -1}).encode(), id="negative-offset"),
        pytest.param(json.dumps({**GOOD_REQUEST, "offset": 1.5}).encode(), id="float-offset"),
        pytest.param(json.dumps({**GOOD_REQUEST, "offset": True}).encode(), id="bool-offset"),
        pytest.param(json.dumps({**GOOD_REQUEST, "length": 0}).encode(), id="zero-length"),
        pytest.param(
            json.dumps({**GOOD_REQUEST, "length": CHUNK_SIZE + 1}).encode(), id="oversize-length"
        ),
        pytest.param(json.dumps({**GOOD_REQUEST, "path": "../x"}).encode(), id="bad-path"),
        pytest.param(json.dumps({**GOOD_REQUEST, "path": 3}).encode(), id="int-path"),
        pytest.param(b" " * 2000, id="oversize-request"),
    ],
)
def test_malformed_requests_raise_wire_error(payload: bytes) -> None:
    with pytest.raises(WireError):
        decode_request(payload)


def test_bad_request_keeps_a_valid_id_for_the_answer() -> None:
    with pytest.raises(WireError) as caught:
        decode_request(json.dumps({**GOOD_REQUEST, "offset": -5}).encode())
    assert caught.value.request_id == "a1"
    with pytest.raises(WireError) as caught:
        decode_request(json.dumps({**GOOD_REQUEST, "id": "../"}).encode())
    assert caught.value.request_id is None


GOOD_HEADER = {"id": "a1", "offset": 0, "total": 3, "status": "ok"}


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"EFD1\x00", id="truncated-length"),
        pytest.param(b"EFD2\x00\x02{}", id="bad-magic"),
        pytest.param(b"EFD1\x00\x40{}", id="truncated-header"),
        pytest.param(b"EFD1\xff\xff" + b"{}" * 40000, id="oversize-header"),
        pytest.param(b"EFD1\x00\x01{", id="bad-json"),
        pytest.param(b"EFD1\x00\x02\xff\xfe", id="not-utf8"),
        pytest.param(_header([1]), id="not-object"),
        pytest.param(_header({**GOOD_HEADER, "extra": 1}), id="extra-key"),
        pytest.param(_header({**GOOD_HEADER, "id": ""}), id="empty-id"),
        pytest.param(_header({**GOOD_HEADER, "offset": -1}), id="negative-offset"),
        pytest.param(_header({**GOOD_HEADER, "total": -1}), id="negative-total"),
        pytest.param(_header({**GOOD_HEADER, "total": "3"}), id="string-total"),
        pytest.param(_header({**GOOD_HEADER, "status": "maybe"}), id="bad-status"),
        pytest.param(_header({**GOOD_HEADER, "status": "not_found"}) + b"x", id="data-with-error"),
        pytest.param(_header(GOOD_HEADER) + bytes(CHUNK_SIZE + 1), id="oversize-chunk"),
    ],
)
def test_malformed_answers_raise_wire_error(payload: bytes) -> None:
    with pytest.raises(WireError):
        decode_answer(payload)


@pytest.mark.parametrize(
    "answer",
    [
        FetchAnswer("zz", 0, 0, "ok"),
        FetchAnswer("a", -1, 0, "ok"),
        FetchAnswer("a", 0, 0, "what"),  # type: ignore[arg-type]
        FetchAnswer("a", 0, 0, "ok", bytes(CHUNK_SIZE + 1)),
    ],
)
def test_encoder_refuses_invalid_answers(answer: FetchAnswer) -> None:
    with pytest.raises(WireError):
        encode_answer(answer)


def test_encoder_refuses_invalid_requests() -> None:
    with pytest.raises(WireError):
        encode_request(FetchRequest("a", "metadata/../root.json", 0, 1))


@given(st.binary(max_size=300) | st.binary(max_size=200).map(lambda b: MAGIC + b))
def test_any_bytes_to_the_answer_decoder_raise_only_wire_error(payload: bytes) -> None:
    with contextlib.suppress(WireError):
        decode_answer(payload)


@given(st.binary(max_size=300))
def test_any_bytes_to_the_request_decoder_raise_only_wire_error(payload: bytes) -> None:
    with contextlib.suppress(WireError):
        decode_request(payload)


@pytest.mark.parametrize(
    "path",
    [
        "metadata/timestamp.json",
        "metadata/1.root.json",
        "targets/models/defect-1.0.0+cpu.tar",
        "targets/assignments/dev-1",
    ],
)
def test_good_paths_pass(path: str) -> None:
    assert validate_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "metadata/../keys/root.json",
        "targets/../metadata/root.json",
        "targets/models/..",
        "targets/./x",
        "targets/.hidden",
        "targets//x",
        "targets/",
        "targets",
        "targets/a\\b",
        "targets/a b",
        "targets/a/b/c/d/e/f/g/h/i",
        "metadata/root",
        "metadata/sub/root.json",
        "keys/root.pem",
        "targets/x\n",
        "targets/" + "a" * 600,
    ],
)
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(WireError):
        validate_path(path)
