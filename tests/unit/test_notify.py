"""The notify payload: exact bytes, round trips, and every malformed input refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.protocol.notify import MAX_NOTIFY_BYTES, NotifyError, decode_notify, encode_notify


def test_bytes_are_compact_json() -> None:
    assert encode_notify(7) == b'{"timestamp_version":7}'
    assert decode_notify(b'{"timestamp_version":7}') == 7
    # Any JSON spelling of the same object is accepted.
    assert decode_notify(b'{ "timestamp_version" : 12 }') == 12


@given(st.integers(min_value=1, max_value=2**63))
def test_round_trip(version: int) -> None:
    assert decode_notify(encode_notify(version)) == version


@pytest.mark.parametrize("version", [0, -1, True])
def test_encode_refuses_bad_versions(version: int) -> None:
    with pytest.raises(ValueError, match="timestamp version"):
        encode_notify(version)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        b"\xff\xfe",
        b"[1]",
        b"{}",
        b'{"timestamp_version":0}',
        b'{"timestamp_version":-3}',
        b'{"timestamp_version":1.5}',
        b'{"timestamp_version":"3"}',
        b'{"timestamp_version":true}',
        b'{"timestamp_version":null}',
        b'{"timestamp_version":3,"extra":1}',
        b'{"snapshot_version":3}',
        b'{"timestamp_version":' + b"9" * MAX_NOTIFY_BYTES + b"}",
        b"[" * 100_000,
    ],
    ids=[
        "empty",
        "garbage",
        "not-utf8",
        "array",
        "empty-object",
        "zero",
        "negative",
        "float",
        "string",
        "bool",
        "null",
        "extra-key",
        "wrong-key",
        "too-long",
        "deep-nesting",
    ],
)
def test_decode_refuses_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(NotifyError):
        decode_notify(payload)
