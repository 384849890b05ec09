"""A virtio-pci driver written for tests: it finds the device through
configuration mechanism #1 on a real I/O Bus, reads the vendor
capabilities, negotiates features, lays out one split virtqueue in a
GuestMemory and submits chains, as a guest driver would.  No guest runs."""

from __future__ import annotations

import struct

from pyvmm.bus import Bus
from pyvmm.devices.pci.host import attach_host_bridge, intx_gsi
from pyvmm.devices.virtio.device import F_VERSION_1
from pyvmm.devices.virtio.queue import DESC, DESC_F_NEXT, DESC_F_WRITE
from pyvmm.devices.virtio.transport.pci import VirtioPci
from pyvmm.irq import IrqLine
from pyvmm.memory import GuestMemory

MIB = 1 << 20
DESC_AT, AVAIL_AT, USED_AT = 0x10000, 0x20000, 0x30000
BUFFERS_AT = 0x100000
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 0x40


class Driver:
    def __init__(self, make_device, class_code: int = 0xFF0000, mem_mib: int = 16):
        self.memory = GuestMemory(mem_mib * MIB)
        self.io, self.mmio = Bus("io"), Bus("mmio")
        self.bridge = attach_host_bridge(self.io, self.mmio)
        self.levels: list[tuple[int, int]] = []
        self.device = make_device(self.memory)
        self.fn = VirtioPci(self.device, class_code)
        self.slot = self.bridge.add(self.fn, "dut")
        self.irq = IrqLine(intx_gsi(self.slot), lambda gsi, level: self.levels.append((gsi, level)))
        self.fn.irq = self.irq
        self.msis: list[tuple[int, int]] = []     # MSI-X messages (address, data) the device sent
        self.fn.msi = lambda address, data: self.msis.append((address, data))
        self.caps = self._find_caps()
        self.next_desc = 0
        self.avail_idx = 0
        self.buf_cursor = BUFFERS_AT

    # --- config space through 0xCF8/0xCFC ------------------------------------------------
    def cfg_read(self, reg: int, size: int = 4, slot: int | None = None) -> int:
        slot = self.slot if slot is None else slot
        self.io.write(0xCF8, 4, 0x80000000 | slot << 11 | reg & 0xFC)
        return self.io.read(0xCFC + (reg & 3), size)

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        self.io.write(0xCF8, 4, 0x80000000 | self.slot << 11 | reg & 0xFC)
        self.io.write(0xCFC + (reg & 3), size, value)

    def bar_base(self, index: int) -> int:
        low = self.cfg_read(0x10 + 4 * index)
        high = self.cfg_read(0x14 + 4 * index) if low & 0x4 else 0
        return (high << 32) | (low & ~0xF)

    def _find_caps(self) -> dict[int, tuple[int, int, int]]:
        caps = {}
        ptr = self.cfg_read(0x34, 1)
        while ptr:
            if self.cfg_read(ptr, 1) == 0x09:
                kind, bar = self.cfg_read(ptr + 3, 1), self.cfg_read(ptr + 4, 1)
                caps[kind] = (bar, self.cfg_read(ptr + 8), self.cfg_read(ptr + 12))
            ptr = self.cfg_read(ptr + 1, 1)
        return caps

    def find_capability(self, cap_id: int) -> int:
        """Config offset of the first capability `cap_id` (0: none)."""
        ptr = self.cfg_read(0x34, 1)
        while ptr and self.cfg_read(ptr, 1) != cap_id:
            ptr = self.cfg_read(ptr + 1, 1)
        return ptr

    def _addr(self, kind: int, offset: int = 0) -> int:
        bar, off, _ = self.caps[kind]
        return self.bar_base(bar) + off + offset

    def common_read(self, offset: int, size: int) -> int:
        return self.mmio.read(self._addr(1, offset), size)

    def common_write(self, offset: int, size: int, value: int) -> None:
        self.mmio.write(self._addr(1, offset), size, value)

    def device_config(self, length: int) -> bytes:
        return bytes(self.mmio.read(self._addr(4, i), 1) for i in range(length))

    def read_isr(self) -> int:
        return self.mmio.read(self._addr(3), 1)

    @property
    def status(self) -> int:
        return self.common_read(0x14, 1)

    # --- bring-up -----------------------------------------------------------------------
    def offered(self) -> int:
        self.common_write(0x00, 4, 0)
        low = self.common_read(0x04, 4)
        self.common_write(0x00, 4, 1)
        return low | self.common_read(0x04, 4) << 32

    def init(self, features: int | None = None, queue_size: int = 16) -> int:
        """Brings the device up with `features` (all offered when None) and
        queue 0 of `queue_size` entries; returns the status read back."""
        self.common_write(0x14, 1, 0)
        self.common_write(0x14, 1, ACK | DRIVER)
        want = self.offered() if features is None else features
        for sel in (0, 1):
            self.common_write(0x08, 4, sel)
            self.common_write(0x0C, 4, (want >> 32 * sel) & 0xFFFFFFFF)
        self.common_write(0x14, 1, ACK | DRIVER | FEATURES_OK)
        if not self.status & FEATURES_OK:
            return self.status
        self.common_write(0x16, 2, 0)
        self.common_write(0x18, 2, queue_size)
        self.queue_size = queue_size
        for off, addr in ((0x20, DESC_AT), (0x28, AVAIL_AT), (0x30, USED_AT)):
            self.common_write(off, 4, addr)          # 64-bit fields written as two halves
            self.common_write(off + 4, 4, 0)
        self.common_write(0x1C, 2, 1)
        self.common_write(0x14, 1, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
        return self.status

    # --- requests -----------------------------------------------------------------------
    def buffer(self, data: bytes | int) -> tuple[int, int]:
        """Places `data` (or reserves that many zeroed bytes) in guest RAM."""
        payload = bytes(data) if isinstance(data, int) else data
        addr = self.buf_cursor
        self.memory.write(addr, payload)
        self.buf_cursor += (len(payload) + 0xFFF) & ~0xFFF or 0x1000
        return addr, len(payload)

    def submit(self, parts: list[tuple[bytes | int, bool]], notify: bool = True) -> list[tuple[int, int]]:
        """Chains `parts` ((data, device-writable)), makes the chain available
        and notifies; returns the (address, length) of each part."""
        placed = [self.buffer(data) for data, _ in parts]
        head = self.next_desc
        for i, ((addr, n), (_, writable)) in enumerate(zip(placed, parts)):
            index = (head + i) % self.queue_size
            last = i == len(parts) - 1
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            self.memory.write(DESC_AT + 16 * index, DESC.pack(addr, n, flags, (index + 1) % self.queue_size))
        self.next_desc = (head + len(parts)) % self.queue_size
        self.memory.write_u16(AVAIL_AT + 4 + 2 * (self.avail_idx % self.queue_size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(AVAIL_AT + 2, self.avail_idx)
        if notify:
            self.kick()
        return placed

    def notify_address(self, queue: int = 0) -> int:
        """Where a kick of `queue` is written (a driver finds it once, as
        Linux maps it at probe time; the BAR may move, so ask again then)."""
        return self._addr(2, 4 * queue)

    def kick(self, queue: int = 0) -> None:
        self.mmio.write(self.notify_address(queue), 2, queue)

    def used(self) -> list[tuple[int, int]]:
        idx = self.memory.read_u16(USED_AT + 2)
        return [struct.unpack("<II", self.memory.read(USED_AT + 4 + 8 * (i % self.queue_size), 8))
                for i in range(idx)]


__all__ = ["Driver", "F_VERSION_1", "MIB", "DESC_AT", "AVAIL_AT", "USED_AT", "NEEDS_RESET", "DRIVER_OK",
           "FEATURES_OK"]
