"""Topic builders and parser: exact strings, round trips, and device ids that must fail."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.protocol import topics

BUILDERS: dict[topics.Kind, Callable[[str], str]] = {
    "state": topics.state,
    "telemetry": topics.telemetry,
    "events": topics.events,
    "fetch": topics.fetch,
    "data": topics.data,
}

valid_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)


def test_builders_cover_every_kind() -> None:
    assert set(BUILDERS) == set(topics.KINDS)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("state", "edgefleet/v1/devices/line-3.cam_01/state"),
        ("telemetry", "edgefleet/v1/devices/line-3.cam_01/telemetry"),
        ("events", "edgefleet/v1/devices/line-3.cam_01/events"),
        ("fetch", "edgefleet/v1/devices/line-3.cam_01/fetch"),
        ("data", "edgefleet/v1/devices/line-3.cam_01/data"),
    ],
)
def test_builder_exact_string(kind: topics.Kind, expected: str) -> None:
    assert BUILDERS[kind]("line-3.cam_01") == expected
    assert topics.parse(expected) == ("line-3.cam_01", kind)


def test_notify() -> None:
    assert topics.NOTIFY == "edgefleet/v1/notify"
    assert topics.parse(topics.NOTIFY) is None


def test_device_filter() -> None:
    assert topics.device_filter("telemetry") == "edgefleet/v1/devices/+/telemetry"
    with pytest.raises(ValueError, match="unknown topic kind"):
        topics.device_filter("images")  # type: ignore[arg-type]


BAD_IDS = {
    "empty": "",
    "slash": "a/b",
    "plus": "+",
    "hash": "#",
    "plus_inside": "dev+1",
    "hash_inside": "dev#1",
    "65_chars": "a" * 65,
    "leading_dot": ".hidden",
    "leading_dash": "-dev",
    "space": "dev 1",
    "trailing_newline": "dev1\n",
    "non_ascii_letter": "caméra",
    "non_ascii_digit": "dev\u0663",
    "nul": "dev\x00",
}


@pytest.mark.parametrize("device_id", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_bad_device_ids_rejected(device_id: str) -> None:
    with pytest.raises(ValueError, match="invalid device id"):
        topics.validate_device_id(device_id)
    for kind, build in BUILDERS.items():
        with pytest.raises(ValueError):
            build(device_id)
        assert topics.parse(f"edgefleet/v1/devices/{device_id}/{kind}") is None


@pytest.mark.parametrize("device_id", ["a", "0", "a" * 64, "A.b_c-9", "9..", "x-"])
def test_good_device_ids_accepted(device_id: str) -> None:
    assert topics.validate_device_id(device_id) == device_id


BAD_TOPICS = {
    "empty": "",
    "other_prefix": "edgefleet/v2/devices/dev1/state",
    "no_kind": "edgefleet/v1/devices/dev1",
    "trailing_slash": "edgefleet/v1/devices/dev1/state/",
    "extra_level": "edgefleet/v1/devices/dev1/state/x",
    "unknown_kind": "edgefleet/v1/devices/dev1/images",
    "kind_case": "edgefleet/v1/devices/dev1/State",
    "wildcard_id": "edgefleet/v1/devices/+/state",
    "filter_hash": "edgefleet/v1/devices/#",
    "leading_slash": "/edgefleet/v1/devices/dev1/state",
    "empty_id": "edgefleet/v1/devices//state",
}


@pytest.mark.parametrize("topic", BAD_TOPICS.values(), ids=BAD_TOPICS.keys())
def test_parse_rejects(topic: str) -> None:
    assert topics.parse(topic) is None


@given(device_id=valid_ids, kind=st.sampled_from(topics.KINDS))
def test_parse_inverts_builders(device_id: str, kind: topics.Kind) -> None:
    topic = BUILDERS[kind](device_id)
    assert topic.startswith(topics.PREFIX)
    assert "+" not in topic and "#" not in topic
    assert topics.parse(topic) == (device_id, kind)


@given(text=st.text(max_size=80))
def test_validate_agrees_with_parse(text: str) -> None:
    try:
        topics.validate_device_id(text)
    except ValueError:
        assert topics.parse(f"edgefleet/v1/devices/{text}/state") is None
    else:
        assert topics.parse(topics.state(text)) == (text, "state")
