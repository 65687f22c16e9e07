"""Fetch requests and their answers, matched by correlation id, for every user of a device.

The transport keeps one handler per topic filter, so the fetch answers of one device
(``topics.data(device_id)``) can have exactly one subscriber per transport. `AnswerRouter`
is that subscriber: `MqttFetcher` (metadata, one chunk at a time) and `BundleDownloader`
(bundles, a window of chunks) both register their correlation ids with the router that
`AnswerRouter.shared` returns for their ``(transport, device_id)``.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import weakref
from collections.abc import Callable
from typing import ClassVar

from edge_agent.protocol import topics
from edge_agent.protocol.fetch_wire import (
    FetchAnswer,
    FetchRequest,
    WireError,
    decode_answer,
    encode_request,
)
from edge_agent.transport import MqttTransport

Deliver = Callable[[FetchAnswer], None]


_ID_BYTES = 8
_POOL_IDS = 256  # ids drawn from the OS at once: one getrandom call instead of one per chunk
_pool = bytearray()
_pool_lock = threading.Lock()
# A forked child must not hand out the ids its parent still holds.
os.register_at_fork(after_in_child=_pool.clear)


def new_request_id() -> str:
    """A fresh random correlation id (16 hex digits)."""
    with _pool_lock:
        if not _pool:
            _pool.extend(secrets.token_bytes(_ID_BYTES * _POOL_IDS))
        drawn = _pool[-_ID_BYTES:]
        del _pool[-_ID_BYTES:]
    return drawn.hex()


class AnswerRouter:
    """Publishes fetch requests for one device and hands each answer to whoever asked.

    Use `shared` rather than the constructor: a second router on the same transport and
    device would replace the first one's subscription.

    Args:
        transport: a started transport (it may still be connecting).
        device_id: whose ``fetch``/``data`` topics to use.
        logger: where ignored answers are logged (debug).

    Raises:
        ValueError: invalid device id.
    """

    _registry: ClassVar[weakref.WeakKeyDictionary[MqttTransport, dict[str, AnswerRouter]]] = (
        weakref.WeakKeyDictionary()
    )
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self, transport: MqttTransport, device_id: str, logger: logging.Logger | None = None
    ) -> None:
        self._transport = transport
        self._device_id = topics.validate_device_id(device_id)
        self._fetch_topic = topics.fetch(device_id)
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._pending: dict[str, Deliver] = {}
        self.ignored = 0  # answers that were malformed or matched no pending id
        # QoS 0 both ways: retries are per chunk anyway, and a QoS 1 PUBACK right before
        # the next small request stalls on Nagle + delayed ACK (about 40 ms a chunk).
        transport.subscribe(topics.data(device_id), self._on_data, qos=0)

    @classmethod
    def shared(cls, transport: MqttTransport, device_id: str) -> AnswerRouter:
        """The one router of ``(transport, device_id)``, created and subscribed on first use.

        Raises:
            ValueError: invalid device id.
        """
        topics.validate_device_id(device_id)
        with cls._registry_lock:
            routers = cls._registry.setdefault(transport, {})
            router = routers.get(device_id)
            if router is None:
                router = cls(transport, device_id)
                routers[device_id] = router
            return router

    def register(self, request_id: str, deliver: Deliver) -> None:
        """Route answers carrying `request_id` to `deliver` until `unregister`.

        `deliver` runs on the network thread: it must be quick and never block.

        Raises:
            RuntimeError: the id is already registered (ids must be fresh).
        """
        with self._lock:
            if request_id in self._pending:
                raise RuntimeError(f"correlation id {request_id} is already pending")
            self._pending[request_id] = deliver

    def unregister(self, request_id: str) -> None:
        """Stop routing `request_id`; later answers for it are ignored. Idempotent."""
        with self._lock:
            self._pending.pop(request_id, None)

    def send(self, request: FetchRequest) -> bool:
        """Publish `request` (QoS 0); False when the transport could not queue it.

        Raises:
            WireError: a field is out of range (a programming error).
        """
        return self._transport.publish(self._fetch_topic, encode_request(request), qos=0)

    def _on_data(self, _topic: str, payload: bytes) -> None:
        # On the network thread: hand the answer over, never block.
        try:
            answer = decode_answer(payload)
        except WireError as e:
            self.ignored += 1
            self._logger.debug("ignoring malformed answer: %s", e)
            return
        with self._lock:
            deliver = self._pending.get(answer.id)
        if deliver is None:
            self.ignored += 1
            self._logger.debug("ignoring answer for unknown or expired id %s", answer.id)
            return
        deliver(answer)
