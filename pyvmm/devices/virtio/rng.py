"""virtio-rng (virtio 1.2, section 5.4): one queue whose device-writable
buffers the device fills with host entropy (os.urandom).

A request's readable buffers are ignored; at most MAX_REQUEST bytes are
given per request, which the driver accepts (it asks again).
"""

from __future__ import annotations

import os
from typing import Callable

from ...memory import GuestMemory
from .device import DEVICE_ID_RNG, VirtioDevice
from .queue import VirtQueue

QUEUE_SIZE = 64
MAX_REQUEST = 64 * 1024


class VirtioRng(VirtioDevice):
    """Entropy from `source(n)` (os.urandom unless a test passes another)."""

    DEVICE_ID = DEVICE_ID_RNG
    QUEUE_SIZES = (QUEUE_SIZE,)

    def __init__(self, memory: GuestMemory, source: Callable[[int], bytes] = os.urandom):
        super().__init__(memory)
        self.source = source
        self.bytes_given = 0

    def __repr__(self) -> str:
        return f"VirtioRng(given={self.bytes_given})"

    def process(self, index: int, queue: VirtQueue) -> None:
        while True:
            chain = queue.pop()
            if chain is None:
                return
            n = min(chain.writable_len, MAX_REQUEST)
            written = chain.write(self.memory, 0, self.source(n)) if n else 0
            self.bytes_given += written
            queue.add_used(chain.head, written)

    def save_fields(self) -> dict:
        return {"bytes_given": self.bytes_given}

    def restore_fields(self, state: dict) -> None:
        self.bytes_given = int(state.get("bytes_given", 0))
