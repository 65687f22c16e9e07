"""Update events: one compact schema, finite figures, bounded size; fuzzed input never
crashes the decoder."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.protocol.events import (
    MAX_EVENT_BYTES,
    EventKind,
    UpdateEvent,
    decode_event,
    encode_event,
)


def test_roundtrip_keeps_every_field() -> None:
    event = UpdateEvent(
        EventKind.GATE_FAILED,
        ts=1_700_000_000.5,
        target="models/m-2.tar",
        sha256="ab" * 32,
        reason="gate_agreement",
        detail="agreement 0.91 < 0.98",
        figures={"agreement": 0.91, "frames": 200.0},
    )
    assert decode_event(encode_event(event)) == event


def test_encoding_is_compact_and_omits_empty_fields() -> None:
    payload = encode_event(UpdateEvent(EventKind.DOWNLOADING, ts=1.0, percent=40))
    assert payload == b'{"v":1,"event":"downloading","ts":1.0,"percent":40}'


def test_non_finite_figures_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        encode_event(UpdateEvent(EventKind.GATE_PASSED, ts=1.0, figures={"x": math.nan}))


def test_long_detail_is_cut_and_size_is_bounded() -> None:
    payload = encode_event(UpdateEvent(EventKind.REFUSED, ts=1.0, detail="x" * 10_000))
    assert len(payload) <= MAX_EVENT_BYTES


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"[]",
        b'{"v":2,"event":"verified","ts":1}',
        b'{"v":1,"event":"exploded","ts":1}',
        b'{"v":1,"event":"verified","ts":"now"}',
        b'{"v":1,"event":"verified","ts":1,"image":"AAAA"}',
        b'{"v":1,"event":"downloading","ts":1,"percent":101}',
        b'{"v":1,"event":"verified","ts":1,"figures":{"a":"b"}}',
        b'{"v":1,"event":"verified","ts":1,"detail":' + b'"' + b"x" * 3000 + b'"}',
    ],
)
def test_malformed_events_are_value_errors(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_event(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_28_fuzzed_event_bytes_never_crash(payload: bytes) -> None:
    with contextlib.suppress(ValueError):
        decode_event(payload)
