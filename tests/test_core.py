"""Core objects without a guest: memory bounds, the bus, the config."""

import ctypes

import pytest

from pyvmm.bus import ALL_ONES, Bus, OffsetView
from pyvmm.config import VmConfig, parse_mem_size
from pyvmm.errors import BusError, ConfigError, GuestMemoryError
from pyvmm.irq import IrqLine
from pyvmm.memory import HIGH_RAM_BASE, LOW_RAM_LIMIT, GuestMemory


class Recorder:
    def __init__(self):
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return 0x10 + offset

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def test_memory_round_trip_and_bounds():
    mem = GuestMemory(1 << 20)
    mem.write(0x1000, b"hello")
    assert mem.read(0x1000, 5) == b"hello"
    mem.write_u64(0xFFFF8, 0x1122334455667788)
    assert mem.read_u32(0xFFFF8) == 0x55667788
    assert mem.read_u64(0xFFFF8) == 0x1122334455667788
    with pytest.raises(GuestMemoryError):
        mem.read(0xFFFFC, 8)  # crosses the end of RAM
    with pytest.raises(GuestMemoryError):
        mem.write(1 << 20, b"x")
    with pytest.raises(GuestMemoryError):
        mem.read(-1, 1)


def test_memory_objects_and_listeners():
    class Pair(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint16)]

    mem = GuestMemory(1 << 20)
    seen = []
    mem.write_listeners.append(lambda gpa, n: seen.append((gpa, n)))
    mem.write_obj(0x200, Pair(7, 9))
    back = mem.read_obj(0x200, Pair)
    assert (back.a, back.b) == (7, 9)
    assert seen == [(0x200, ctypes.sizeof(Pair))]


def test_memory_splits_around_the_pci_hole():
    mem = GuestMemory(LOW_RAM_LIMIT + (64 << 20))
    assert mem.ram_ranges() == [(0, LOW_RAM_LIMIT), (HIGH_RAM_BASE, 64 << 20)]
    assert not mem.is_ram(LOW_RAM_LIMIT)
    mem.write_u32(HIGH_RAM_BASE + 16, 0xDEADBEEF)
    assert mem.read_u32(HIGH_RAM_BASE + 16) == 0xDEADBEEF
    mem.close()


def test_bus_dispatches_by_offset_and_counts_unmapped():
    bus = Bus("io")
    dev = Recorder()
    bus.insert(0x3F8, 8, dev, "uart")
    assert bus.read(0x3FD, 1) == 0x15
    bus.write(0x3F8, 1, 0x41)
    assert dev.log == [("r", 5, 1), ("w", 0, 1, 0x41)]
    assert bus.read(0x2F8, 2) == ALL_ONES[2]
    bus.write(0x2F8, 1, 0)
    assert (bus.unmapped_reads, bus.unmapped_writes) == (1, 1)
    assert bus.stats()["uart"] == {"reads": 1, "writes": 1}


@pytest.mark.parametrize("base,length", [(0x3F0, 9), (0x3FF, 1), (0x3F8, 8), (0x3F0, 0x20)])
def test_bus_refuses_overlaps(base, length):
    bus = Bus("io")
    bus.insert(0x3F8, 8, Recorder())
    with pytest.raises(BusError):
        bus.insert(base, length, Recorder())


def test_bus_accepts_neighbours_and_offset_views():
    bus = Bus("io")
    dev = Recorder()
    bus.insert(0x60, 1, dev)
    bus.insert(0x64, 1, OffsetView(dev, 4))
    bus.insert(0x61, 3, Recorder())
    assert bus.read(0x64, 1) == 0x14
    assert dev.log[-1] == ("r", 4, 1)


def test_irq_line_reports_edges_only():
    seen = []
    line = IrqLine(4, lambda gsi, level: seen.append((gsi, level)))
    line.set_level(1)
    line.set_level(1)
    line.set_level(0)
    line.pulse()
    assert seen == [(4, 1), (4, 0), (4, 1), (4, 0)]
    assert line.raised == 2


@pytest.mark.parametrize("text,mib", [("512", 512), ("256M", 256), ("1G", 1024), ("2g", 2048), ("64MiB", 64)])
def test_mem_sizes(text, mib):
    assert parse_mem_size(text) == mib


@pytest.mark.parametrize("text", ["", "lots", "1.5G", "100K", "-5"])
def test_bad_mem_sizes(text):
    with pytest.raises(ConfigError):
        parse_mem_size(text)


def test_config_validation():
    VmConfig().validate()
    for bad in (VmConfig(mem_mib=4), VmConfig(cpus=0), VmConfig(engine="qemu")):
        with pytest.raises(ConfigError):
            bad.validate()
