"""What every virtio device model is to its transport: an id, the features
it offers, its config bytes and what it does with a notified queue.

A device model never sees the transport's registers: the transport
(transport/pci.py) negotiates features, builds the VirtQueues when the
driver enables them, and calls `process(index, queue)` on a notify.  The
device pops chains, answers them with add_used(), and returns; a
QueueError it lets through makes the transport set NEEDS_RESET.
"""

from __future__ import annotations

from typing import Callable

from ...memory import GuestMemory
from .queue import VirtQueue

# Device types (virtio 1.2, section 5).
DEVICE_ID_BLOCK, DEVICE_ID_RNG = 2, 4

# Reserved feature bits (section 6).
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_VERSION_1

# Device status bits (section 2.1).
STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK = 1, 2, 4
STATUS_FEATURES_OK, STATUS_NEEDS_RESET, STATUS_FAILED = 8, 0x40, 0x80


class VirtioDevice:
    """Base of the device models: subclasses set DEVICE_ID, QUEUE_SIZES,
    `features` (device-specific bits; the transport adds its own) and
    implement process(); those with config space override config_bytes()."""

    DEVICE_ID = 0
    QUEUE_SIZES: tuple[int, ...] = ()

    def __init__(self, memory: GuestMemory):
        self.memory = memory
        self.features = 0
        self.acked = 0          # what the driver accepted, set at FEATURES_OK
        # Signals the driver that config_bytes() changed: the transport
        # sets it to its config-change interrupt.
        self.config_changed: Callable[[], None] = lambda: None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(acked={self.acked:#x})"

    @property
    def offered(self) -> int:
        return self.features | TRANSPORT_FEATURES

    def config_bytes(self) -> bytes:
        """The device-specific config structure as the driver reads it."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """The driver wrote config bytes (most devices ignore it)."""

    def process(self, index: int, queue: VirtQueue) -> None:
        """Handles what the driver made available on queue `index`.
        Raises QueueError for a broken queue."""

    def reset(self) -> None:
        """The driver reset the device (status 0)."""
        self.acked = 0

    def save_fields(self) -> dict:
        """Device-specific state, saved inside the transport's (VirtioPci's
        STATE_VERSION covers it)."""
        return {}

    def restore_fields(self, state: dict) -> None:
        """Loads save_fields(). Raises what device.restore_state catches."""
