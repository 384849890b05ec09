"""virtio-mmio version 2 (transport/mmio.py) driven from the host side as
the Linux driver does it: registers on a real MMIO Bus, a split virtqueue
in a GuestMemory, virtio-rng and virtio-blk behind it; and the builder's
--transport mmio placement with the virtio_mmio.device= parameters."""

from __future__ import annotations

import struct

import pytest

from pyvmm.bus import Bus
from pyvmm.config import VmConfig, parse_drive
from pyvmm.devices.virtio.block import HEADER, VirtioBlock
from pyvmm.devices.virtio.device import F_VERSION_1
from pyvmm.devices.virtio.queue import DESC, DESC_F_NEXT, DESC_F_WRITE
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.transport.mmio import MAGIC, VirtioMmio
from pyvmm.errors import ConfigError
from pyvmm.irq import IrqLine
from pyvmm.memory import GuestMemory
from pyvmm.storage import open_image

BASE = 0xD0000000
DESC_AT, AVAIL_AT, USED_AT, BUFFERS_AT = 0x10000, 0x20000, 0x30000, 0x100000
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 0x40
QSIZE = 16


class MmioDriver:
    def __init__(self, make_device):
        self.memory = GuestMemory(16 << 20)
        self.bus = Bus("mmio", serialize=False)
        self.edges: list[int] = []
        self.fn = VirtioMmio(make_device(self.memory), IrqLine(5, lambda gsi, level: self.edges.append(level)))
        self.bus.insert(BASE, 0x1000, self.fn, "dut")
        self.next = self.avail = 0
        self.cursor = BUFFERS_AT

    def r(self, off: int) -> int:
        return self.bus.read(BASE + off, 4)

    def w(self, off: int, value: int) -> None:
        self.bus.write(BASE + off, 4, value)

    def init(self, features: int = F_VERSION_1, rings=(DESC_AT, AVAIL_AT, USED_AT)) -> int:
        self.w(0x70, 0)
        self.w(0x70, ACK | DRIVER)
        for sel in (0, 1):
            self.w(0x24, sel)
            self.w(0x20, (features >> 32 * sel) & 0xFFFFFFFF)
        self.w(0x70, ACK | DRIVER | FEATURES_OK)
        if not self.r(0x70) & FEATURES_OK:
            return self.r(0x70)
        self.w(0x30, 0)
        assert self.r(0x34) >= QSIZE and self.r(0x44) == 0
        self.w(0x38, QSIZE)
        for off, addr in zip((0x80, 0x90, 0xA0), rings):
            self.w(off, addr & 0xFFFFFFFF)
            self.w(off + 4, addr >> 32)
        self.w(0x44, 1)
        self.w(0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
        return self.r(0x70)

    def submit(self, parts: list[tuple[bytes | int, bool]]) -> list[int]:
        addrs = []
        head = self.next
        for i, (data, writable) in enumerate(parts):
            payload = bytes(data) if isinstance(data, int) else data
            self.memory.write(self.cursor, payload)
            index = (head + i) % QSIZE
            flags = (DESC_F_WRITE if writable else 0) | (0 if i == len(parts) - 1 else DESC_F_NEXT)
            self.memory.write(DESC_AT + 16 * index, DESC.pack(self.cursor, len(payload), flags, (index + 1) % QSIZE))
            addrs.append(self.cursor)
            self.cursor += 0x1000
        self.next = (head + len(parts)) % QSIZE
        self.memory.write_u16(AVAIL_AT + 4 + 2 * (self.avail % QSIZE), head)
        self.avail += 1
        self.memory.write_u16(AVAIL_AT + 2, self.avail)
        self.w(0x50, 0)
        return addrs

    def used(self) -> list[tuple[int, int]]:
        return [struct.unpack("<II", self.memory.read(USED_AT + 4 + 8 * i, 8))
                for i in range(self.memory.read_u16(USED_AT + 2))]


def rng():
    return MmioDriver(lambda mem: VirtioRng(mem, source=lambda n: b"\x5a" * n))


def test_identification_registers():
    d = rng()
    assert (d.r(0x00), d.r(0x04), d.r(0x08)) == (MAGIC, 2, 4)
    d.w(0x14, 1)
    assert d.r(0x10) & 1 == 1                          # VERSION_1 is bit 32
    assert d.r(0xB0) == 0xFFFFFFFF                    # no shared memory regions


def test_rng_request_interrupt_and_ack():
    d = rng()
    assert d.init() & DRIVER_OK
    (addr,) = d.submit([(32, True)])
    assert d.used() == [(0, 32)] and d.memory.read(addr, 32) == b"\x5a" * 32
    assert d.r(0x60) == 1 and d.edges == [1, 0]       # one edge per event
    d.submit([(8, True)])
    assert d.edges == [1, 0, 1, 0]                    # a second event before the ACK still gets an edge
    d.w(0x64, 1)
    assert d.r(0x60) == 0


def test_block_read_write_through_mmio(tmp_path):
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(range(256)) * 16)
    image = open_image(str(path), "raw")
    d = MmioDriver(lambda mem: VirtioBlock(mem, image, serial="mmio0"))
    try:
        assert d.init() & DRIVER_OK
        capacity = struct.unpack("<Q", bytes(d.bus.read(BASE + 0x100 + i, 1) for i in range(8)))[0]
        assert capacity == 8
        _, data, status = d.submit([(HEADER.pack(0, 0, 1), False), (512, True), (1, True)])
        _wait_used(d, 1)
        assert d.memory.read(data, 512) == (bytes(range(256)) * 2) and d.memory.read(status, 1) == b"\0"
        d.submit([(HEADER.pack(1, 0, 2), False), (b"\xee" * 512, False), (1, True)])
        _wait_used(d, 2)
    finally:
        stop = getattr(d.fn.device, "stop_io", None)
        if stop is not None:
            stop()
        image.close()
    assert path.read_bytes()[1024:1536] == b"\xee" * 512


def _wait_used(d: MmioDriver, count: int) -> None:
    """Requests may complete on an I/O thread: run what it handed back."""
    import time
    deadline = time.monotonic() + 5
    while len(d.used()) < count:
        assert time.monotonic() < deadline, "request not completed"
        time.sleep(0.005)


@pytest.mark.parametrize("features, rings", [
    (0, (DESC_AT, AVAIL_AT, USED_AT)),                        # no VERSION_1: FEATURES_OK refused
    (F_VERSION_1 | 1 << 40, (DESC_AT, AVAIL_AT, USED_AT)),    # a bit never offered
])
def test_features_ok_refused(features, rings):
    d = rng()
    assert not d.init(features, rings) & FEATURES_OK


def test_bad_ring_and_hostile_chain_need_reset():
    d = rng()
    assert d.init(rings=(DESC_AT, AVAIL_AT, 0xFFFF0000)) & NEEDS_RESET   # used ring outside RAM
    d = rng()
    d.init()
    d.memory.write(DESC_AT, DESC.pack(BUFFERS_AT, 16, DESC_F_NEXT | DESC_F_WRITE, 0))   # loops on itself
    d.memory.write_u16(AVAIL_AT + 2, 1)
    d.w(0x50, 0)
    assert d.r(0x70) & NEEDS_RESET and d.r(0x60) & 2


def test_notify_before_driver_ok_is_ignored_and_state_round_trips():
    d = rng()
    d.w(0x50, 0)
    assert d.edges == []
    d.init()
    d.submit([(4, True)])
    state = d.fn.save()
    e = rng()
    e.memory.write(0, d.memory.read(0, 1 << 20))
    e.fn.restore(state)
    assert e.r(0x70) & DRIVER_OK and e.r(0x44) == 1 and e.r(0x60) == 1


def test_builder_places_mmio_pages_and_announces_them(tmp_path):
    from pyvmm.boot.result import BootResult
    from pyvmm.builder import build_machine, destroy_machine
    from pyvmm.cpu import CpuState
    from pyvmm.devices.virtio.install import with_mmio_cmdline
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    cfg = VmConfig(engine="bt", mem_mib=32, drives=[parse_drive(f"file={disk}")], virtio_rng=True,
                   virtio_transport="mmio")
    assert with_mmio_cmdline(cfg).linux_cmdline_extra.split() == [
        "virtio_mmio.device=4K@0xd0000000:5", "virtio_mmio.device=4K@0xd0001000:6"]
    machine = build_machine(cfg, lambda b: None, boot=lambda memory: BootResult(cpu=CpuState(), protocol="test"))
    try:
        assert "pci_host" not in machine.devices
        assert machine.mmio_bus.read(0xD0001000, 4) == MAGIC and machine.mmio_bus.read(0xD0001008, 4) == 4
        assert machine.mmio_bus.read(0xD0000008, 4) == 2
        assert machine.devices["virtio_rng"].irq.gsi == 6
    finally:
        destroy_machine(machine)
    with pytest.raises(ConfigError):
        VmConfig(virtio_transport="isa").validate()
    with pytest.raises(ConfigError):
        with_mmio_cmdline(VmConfig(virtio_transport="mmio", drives=[parse_drive(f"file={disk}")] * 8))


def test_random_register_accesses_never_escape_the_transport():
    """Random register traffic with rings full of junk (test_virtio_fuzz's
    generator): only NEEDS_RESET or refused features may come of it."""
    import random

    from .test_virtio_fuzz import AVAIL_AT as F_AVAIL, DESC_AT as F_DESC, USED_AT as F_USED, scribble
    from pyvmm.devices.virtio.queue import VirtQueue
    r = random.Random(7)
    d = rng()
    useful = [(0x70, v) for v in (0, 1, 3, 11, 15, 0x4F)] + [(0x38, v) for v in (8, 7, 0, 4096)] + \
             [(0x80, F_DESC), (0x90, F_AVAIL), (0xA0, F_USED), (0x84, 0), (0x44, 1), (0x44, 0), (0x30, 0),
              (0x30, 5), (0x24, 1), (0x20, 1), (0x24, 0), (0x20, 0xFFFFFFFF), (0x20, 0), (0x20, 1 << 28),
              (0x64, 3), (0x50, 0), (0x50, 9)]
    up = 0
    for i in range(3000):
        if r.random() < 0.02:
            d.init(rings=(F_DESC, F_AVAIL, F_USED))     # a proper bring-up now and then
        elif r.random() < 0.7:
            d.w(*r.choice(useful))
        elif r.random() < 0.5:
            q = d.fn.queues[0]
            scribble(r, d.memory, q.vq or VirtQueue(d.memory, 8, F_DESC, F_AVAIL, F_USED), i)
            d.w(0x50, 0)
        else:
            size, offset = r.choice((1, 2, 4, 8)), r.randrange(0x200)
            if r.random() < 0.5:
                d.bus.write(BASE + offset, size, r.randrange(1 << 8 * size))
            else:
                d.bus.read(BASE + offset, size)
        up += bool(d.fn.status & DRIVER_OK and d.fn.queues[0].vq is not None)
        assert 0 <= d.fn.status < 256
    assert up
