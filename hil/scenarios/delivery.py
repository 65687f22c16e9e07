"""What the fleet sees of a device's telemetry: a broker that keeps sessions across a
restart, and the check that windows arrived in order with no gap the spool did not count.
Shared by the broker-outage and partition scenarios."""

from __future__ import annotations

import itertools
from pathlib import Path

from edge_agent.protocol.telemetry import decode_window
from edge_agent.telemetry.device import spool_dir
from edge_agent.telemetry.spool import SpoolCounts, read_counts
from hil.scenarios.result import Result
from tests.mqtt_broker import MosquittoBroker


class PersistentBroker(MosquittoBroker):
    """Mosquitto with persistence, so the observer's QoS 1 session outlives a restart and
    misses nothing the device sends while the observer reconnects. ``extra_listeners``
    adds ``(address, port)`` listeners (the partition's veth address)."""

    def __init__(self, extra_listeners: tuple[tuple[str, int], ...] = ()) -> None:
        super().__init__()
        text = self._conf.read_text(encoding="utf-8").replace("persistence false\n", "")
        text += f"persistence true\npersistence_location {self._dir}/\n"
        for address, port in extra_listeners:
            text += f"listener {port} {address}\n"
        self._conf.write_text(text, encoding="utf-8")


def spool_counts(state_dir: Path) -> SpoolCounts | None:
    return read_counts(spool_dir(state_dir))


def queued(state_dir: Path) -> int:
    counts = spool_counts(state_dir)
    return 0 if counts is None else counts.queued


def check_windows(result: Result, payloads: list[bytes], state_dir: Path) -> None:
    """Windows seen on the broker must have increasing seq; a gap is allowed only as large
    as the spool's ``dropped`` count, and a repeat only right after its first copy (a QoS 1
    redelivery of the window the broker took as it went away). Adds the figures."""
    seqs = [decode_window(p).seq for p in payloads]
    distinct = [s for i, s in enumerate(seqs) if i == 0 or s != seqs[i - 1]]
    counts = spool_counts(state_dir)
    dropped = 0 if counts is None else counts.dropped
    out_of_order = sum(1 for a, b in itertools.pairwise(distinct) if b <= a)
    missing = sum(b - a - 1 for a, b in itertools.pairwise(distinct) if b > a + 1)
    result.figures.update(
        windows_seen=len(seqs),
        windows_distinct=len(distinct),
        windows_repeated=len(seqs) - len(distinct),
        windows_out_of_order=out_of_order,
        windows_missing=missing,
        spool_dropped=dropped,
        spool_queued_at_end=None if counts is None else counts.queued,
    )
    result.check(len(distinct) >= 2, f"only {len(distinct)} telemetry windows reached the broker")
    result.check(out_of_order == 0, f"windows out of order: {seqs}")
    result.check(missing <= dropped, f"{missing} windows missing, spool dropped {dropped}")
    result.check(len(seqs) - len(distinct) <= 1, f"repeats beyond one redelivery: {seqs}")
    if counts is not None and distinct:
        # Every window the agent closed was sent, the one closed at the stop included.
        result.check(
            counts.queued == 0 and counts.next_seq == distinct[-1] + 1,
            f"spool ends with {counts.queued} queued, next seq {counts.next_seq}, "
            f"last seen {distinct[-1]}",
        )
