"""The update path's error family: every refusal carries a typed `Reason`.

``UpdateError`` is the trust boundary's family (a bad or unwanted update). The reason is
what the device reports on ``devices/{id}/events`` and what the attack tests assert on.
Misuse of the API (calling a step out of order) is a plain ``RuntimeError`` instead.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why an update was refused, failed or rolled back."""

    # metadata and trust (python-tuf refused, or the two-role check failed)
    METADATA = "metadata"  # signature, threshold, version, expiry or consistency
    NO_ASSIGNMENT = "no_assignment"
    WRONG_DEVICE = "wrong_device"
    NOT_RELEASED = "not_released"
    INCOMPATIBLE = "incompatible"  # profile or runtime the device cannot run
    COUNTER_ROLLBACK = "counter_rollback"  # release counter lower than installed
    BLOCKLISTED = "blocklisted"
    # transfer
    TRANSPORT = "transport"  # broker unreachable or server silent
    TOO_SLOW = "too_slow"  # below the minimum throughput; resumable later
    LENGTH_MISMATCH = "length_mismatch"
    HASH_MISMATCH = "hash_mismatch"
    DISK_FULL = "disk_full"
    # install
    BAD_ARCHIVE = "bad_archive"  # unsafe or malformed tar
    BAD_BUNDLE = "bad_bundle"  # manifest or file list does not verify
    # health gate
    GATE_LOAD = "gate_load"
    GATE_NAN = "gate_nan"
    GATE_GOLDEN = "gate_golden"
    GATE_LATENCY = "gate_latency"
    GATE_MEMORY = "gate_memory"
    GATE_AGREEMENT = "gate_agreement"
    GATE_TIMEOUT = "gate_timeout"  # not enough live frames to shadow-run in time
    GATE_CRASHED = "gate_crashed"  # the agent died during the gate too often


class UpdateError(Exception):
    """An update was refused or failed; ``reason`` says why in one word.

    Args:
        reason: the typed reason.
        message: a sentence for logs and events, naming the file, role or figure.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
        self.reported = False  # set once an event has told the fleet about it


class TrustError(UpdateError):
    """Metadata or the two-role (director + release) check refused the update."""


class TransferError(UpdateError):
    """The bundle's bytes did not arrive intact (length, hash, time, disk)."""


class InstallError(UpdateError):
    """The verified archive could not be unpacked into a valid bundle."""


class GateError(UpdateError):
    """The candidate model failed the health gate."""
