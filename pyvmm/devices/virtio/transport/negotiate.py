"""What every virtio transport does the same way (virtio 1.2, 3.1.1 and
2.7): accept or refuse the driver's features when it sets FEATURES_OK,
and open a queue's rings when the driver enables it.  PCI and MMIO differ
only in the registers that lead here."""

from __future__ import annotations

import logging

from ..device import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, STATUS_FEATURES_OK, STATUS_NEEDS_RESET
from ..queue import QueueError, VirtQueue

log = logging.getLogger(__name__)


def accept_status(device, driver_features: int, old: int, value: int, transport: str) -> int:
    """The status after the driver writes `value` (nonzero: a zero write is
    a reset, which the transport does).  FEATURES_OK stays clear when the
    driver asks for a feature the device does not offer or leaves out
    VERSION_1; otherwise the device takes the features.  NEEDS_RESET sticks."""
    if value & ~old & STATUS_FEATURES_OK:
        if driver_features & ~device.offered or not driver_features & F_VERSION_1:
            log.info("%s: FEATURES_OK refused (features %#x)", transport, driver_features)
            value &= ~STATUS_FEATURES_OK
        else:
            device.acked = driver_features
    return value | old & STATUS_NEEDS_RESET


def open_rings(device, q, status: int) -> VirtQueue:
    """The VirtQueue for queue config q (size, max_size, desc, driver,
    device) as the driver enabled it.  Raises QueueError with the reason the
    device then needs a reset."""
    if not status & STATUS_FEATURES_OK:
        raise QueueError("queue enabled before FEATURES_OK")
    if q.size > q.max_size:
        raise QueueError(f"queue size {q.size} above the maximum {q.max_size}")
    return VirtQueue(device.memory, q.size, q.desc, q.driver, q.device,
                     event_idx=bool(device.acked & F_RING_EVENT_IDX),
                     indirect=bool(device.acked & F_RING_INDIRECT_DESC))
