"""Per-device seq order for the detectors (fleet_server.domain.sequencing)."""

from __future__ import annotations

import pytest

from fleet_server.domain.sequencing import SeqOrderer


def test_in_order_windows_are_released_at_once() -> None:
    order: SeqOrderer[str] = SeqOrderer(wait_s=5.0)
    assert order.offer("a", 1, "a1", now=0.0) == ["a1"]
    assert order.offer("a", 2, "a2", now=0.0) == ["a2"]
    assert order.offer("b", 7, "b7", now=0.0) == ["b7"]  # a device's first window
    assert order.last("a") == 2 and order.last("b") == 7


def test_a_gap_is_waited_for_and_filled_in_order() -> None:
    order: SeqOrderer[str] = SeqOrderer(wait_s=5.0)
    order.offer("a", 1, "a1", now=0.0)
    assert order.offer("a", 3, "a3", now=1.0) == []
    assert order.offer("a", 4, "a4", now=1.5) == []
    assert order.waiting() == 2
    assert order.offer("a", 2, "a2", now=2.0) == ["a2", "a3", "a4"]
    assert order.waiting() == 0 and order.due(100.0) == []


def test_a_gap_that_never_fills_is_given_up_after_the_wait() -> None:
    order: SeqOrderer[str] = SeqOrderer(wait_s=5.0)
    order.offer("a", 1, "a1", now=0.0)
    order.offer("a", 4, "a4", now=1.0)
    order.offer("a", 3, "a3", now=2.0)
    assert order.due(5.9) == []
    assert order.due(6.0) == [("a", "a3"), ("a", "a4")]
    assert order.last("a") == 4
    # The missing window arriving now is late: stored by ingest, never fed.
    assert order.offer("a", 2, "a2", now=7.0) is None
    assert order.offer("a", 4, "again", now=7.0) is None


def test_priming_after_a_restart_makes_replayed_seqs_late() -> None:
    order: SeqOrderer[str] = SeqOrderer(wait_s=0.0)
    order.prime("a", 10)
    assert order.offer("a", 10, "a10", now=0.0) is None
    assert order.offer("a", 11, "a11", now=0.0) == ["a11"]
    with pytest.raises(ValueError, match="wait_s"):
        SeqOrderer(wait_s=-1.0)
