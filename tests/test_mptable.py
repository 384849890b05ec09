"""MP table: written into guest memory, parsed back, checksums and entries checked."""

import struct

import pytest

from pyvmm.boot import layout
from pyvmm.boot.mptable import (ALL_LAPICS, INT_TYPE_EXTINT, INT_TYPE_INT, INT_TYPE_NMI,
                                build_mptable, read_mptable, write_mptable)
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory


@pytest.fixture
def mem():
    m = GuestMemory(16 << 20)
    yield m
    m.close()


@pytest.mark.parametrize("cpus", [1, 4, 40])
def test_checksums_and_counts(mem, cpus):
    assert write_mptable(mem, cpus) == layout.EBDA_ADDR
    fp = mem.read(layout.EBDA_ADDR, 16)
    assert fp[:4] == b"_MP_"
    assert fp[8] == 1 and fp[9] == 4              # 16 bytes, spec 1.4
    assert sum(fp) & 0xFF == 0
    assert fp[11] == 0                            # feature byte 1: table present, not a default config
    config_addr = struct.unpack_from("<I", fp, 4)[0]
    length, count = struct.unpack_from("<H", mem.read(config_addr + 4, 2))[0], \
        struct.unpack_from("<H", mem.read(config_addr + 34, 2))[0]
    table = mem.read(config_addr, length)
    assert table[:4] == b"PCMP"
    assert sum(table) & 0xFF == 0
    assert config_addr + length <= layout.EBDA_END
    # cpus processors + bus + ioapic + 15 ISA routes + 2 local interrupts
    assert count == cpus + 1 + 1 + 15 + 2


def test_entries(mem):
    write_mptable(mem, 4)
    mp = read_mptable(mem)
    assert mp.lapic_addr == layout.LAPIC_ADDR
    assert [p[0] for p in mp.processors] == [0, 1, 2, 3]
    assert [p[2] for p in mp.processors] == [3, 1, 1, 1]    # enabled; BSP flag only on CPU 0
    assert mp.buses == [(0, b"ISA   ")]
    assert mp.ioapics == [(4, 0x11, 1, layout.IOAPIC_ADDR)]
    routes = {irq: (dst, pin) for typ, _, bus, irq, dst, pin in mp.io_interrupts if typ == INT_TYPE_INT}
    assert routes[0] == (4, 2)                               # PIT on pin 2
    assert all(routes[i] == (4, i) for i in range(1, 16) if i != 2)
    assert 2 not in routes                                   # the cascade has no route
    lints = {(typ, pin, dst) for typ, _, _, _, dst, pin in mp.local_interrupts}
    assert lints == {(INT_TYPE_EXTINT, 0, ALL_LAPICS), (INT_TYPE_NMI, 1, ALL_LAPICS)}
    assert mem.read_u16(0x40E) == layout.EBDA_ADDR >> 4


def test_many_cpus_go_to_bios_area(mem):
    addr = write_mptable(mem, 64)
    assert layout.BIOS_AREA_ADDR <= addr and addr + 16 <= layout.BIOS_AREA_END
    mp = read_mptable(mem, addr)
    assert len(mp.processors) == 64 and mp.ioapics[0][0] == 64
    assert mp.config_addr + 44 + 20 * 64 <= layout.BIOS_AREA_END


def test_explicit_area_too_small(mem):
    with pytest.raises(ConfigError, match="MP table for 41 CPUs needs"):
        write_mptable(mem, 41, addr=layout.EBDA_ADDR, limit=layout.EBDA_END)


def test_bad_cpu_count():
    with pytest.raises(ConfigError):
        build_mptable(0)


def test_larger_area_takes_more_cpus(mem):
    write_mptable(mem, 64, addr=0x80000, limit=0x90000)
    mp = read_mptable(mem, 0x80000)
    assert len(mp.processors) == 64
    assert mp.ioapics[0][0] == 64
