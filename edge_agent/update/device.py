"""Builds the device's update path from plain values (``service.py`` reads the config).

- `open_slots`: the A/B slot store, seeded with the factory bundle on first start.
- `open_active_model`: load the active slot; if that fails, the other one (and point at
  it); if neither loads, the factory bundle itself. The line always gets a model.
- `start_updates`: TUF client, downloader, state and the `UpdateManager`, on the agent's
  one MQTT transport (shared with telemetry and the device state).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.inspect import Inspector
from edge_agent.protocol.errors import BundleError
from edge_agent.protocol.manifest import MANIFEST_NAME
from edge_agent.runtimes import ModelLoadError
from edge_agent.transport import MqttTransport
from edge_agent.update.download import BundleDownloader
from edge_agent.update.manager import UpdateManager, UpdateSettings
from edge_agent.update.mqtt_fetcher import MqttFetcher
from edge_agent.update.slots import ReleaseInfo, SlotInfo, SlotStore
from edge_agent.update.state import StateFile
from edge_agent.update.trust import DeviceFacts, TrustClient

log = logging.getLogger("edge_agent.update")

FACTORY_TARGET = "factory"


@dataclass(frozen=True, slots=True)
class FleetLink:
    """What the update path needs to know about the fleet and this device."""

    root_metadata: bytes
    device: DeviceFacts
    state_dir: Path
    settings: UpdateSettings


def open_slots(state_dir: Path, factory_bundle: Path, max_bundle_bytes: int) -> SlotStore:
    """The slot store under ``state_dir/update``, seeded with ``factory_bundle`` if empty.

    Raises:
        InstallError: the store is empty and the factory bundle does not verify.
    """
    slots = SlotStore(state_dir / "update", max_bundle_bytes=max_bundle_bytes)
    if slots.active() is None:
        digest = hashlib.sha256((factory_bundle / MANIFEST_NAME).read_bytes()).hexdigest()
        slots.seed(factory_bundle, ReleaseInfo(FACTORY_TARGET, digest, 0))
    return slots


def open_active_model(
    slots: SlotStore, open_model: Callable[[Path], Inspector], factory_bundle: Path
) -> tuple[Inspector, SlotInfo | None]:
    """Open the active slot's model, else the other slot's (which then becomes active),
    else the factory bundle's.

    Raises:
        BundleError, ModelLoadError: not even the factory bundle loads.
    """
    order = slots.load_order()
    for info in order:
        try:
            inspector = open_model(info.path)
        except (BundleError, ModelLoadError, OSError, ValueError) as e:
            log.error(
                "slot does not load",
                extra={"event": "slot_load_failed", "slot": info.slot, "error": str(e)},
            )
            continue
        if info is not order[0]:
            slots.activate(info.slot)
            log.warning(
                "booted the other slot",
                extra={"event": "slot_fallback", "slot": info.slot, "model": info.model_name},
            )
        return inspector, info
    log.error("no slot loads; using the factory bundle", extra={"event": "slot_none"})
    return open_model(factory_bundle), None


def start_updates(
    link: FleetLink,
    transport: MqttTransport,
    slots: SlotStore,
    open_model: Callable[[Path], Inspector],
    swap: Callable[[Inspector], None],
) -> UpdateManager:
    """Start the update loop on ``transport`` (started by the caller, which also stops it
    after ``UpdateManager.stop``)."""
    device_id = link.device.device_id
    update_dir = link.state_dir / "update"
    manager = UpdateManager(
        transport=transport,
        device_id=device_id,
        trust=TrustClient(
            update_dir / "trust",
            link.root_metadata,
            MqttFetcher(transport, device_id),
            link.device,
        ),
        downloader=BundleDownloader(transport, device_id, update_dir / "downloads"),
        slots=slots,
        state=StateFile(update_dir / "state.json"),
        open_model=open_model,
        swap=swap,
        settings=link.settings,
    )
    manager.start()
    return manager
