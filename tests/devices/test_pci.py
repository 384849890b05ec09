"""The PCI host bridge and config space, driven through ports 0xCF8/0xCFC
on a real Bus, and the DSDT's AML for the root bridge."""

from __future__ import annotations

import struct

import pytest

from pyvmm.boot import acpi
from pyvmm.bus import Bus
from pyvmm.devices.pci import aml
from pyvmm.devices.pci.function import PciFunction
from pyvmm.devices.pci.host import ECAM_BASE, ECAM_SIZE, MMIO_WINDOW, attach_host_bridge, intx_gsi
from pyvmm.device import DeviceStateError
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory

from .virtio_driver import Driver


class Regs:
    """A BAR target that remembers what was written."""

    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return 0x1000 + offset

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def make():
    io, mmio = Bus("io"), Bus("mmio")
    bridge = attach_host_bridge(io, mmio)
    fn = PciFunction(0x1234, 0x5678, 0x020000, revision=3)
    target, ports = Regs(), Regs()
    fn.add_bar(0, 0x1000, "mem32", target)
    fn.add_bar(2, 0x4000, "mem64", target, prefetchable=True)
    fn.add_bar(4, 0x20, "io", ports)
    fn.add_capability(0x09, b"\x04abc")
    slot = bridge.add(fn, "test")
    return io, mmio, bridge, fn, slot, target, ports


def cfg(io, slot, reg, size=4, func=0, bus=0, enable=True):
    io.write(0xCF8, 4, (0x80000000 if enable else 0) | bus << 16 | slot << 11 | func << 8 | reg & 0xFC)
    return io.read(0xCFC + (reg & 3), size)


def cfg_write(io, slot, reg, size, value):
    io.write(0xCF8, 4, 0x80000000 | slot << 11 | reg & 0xFC)
    io.write(0xCFC + (reg & 3), size, value)


def test_config_mechanism_1_finds_the_host_bridge_and_the_device():
    io, mmio, bridge, fn, slot, *_ = make()
    io.write(0xCF8, 4, 0x80001234 | 3)
    assert io.read(0xCF8, 4) == 0x80001234           # low two bits read as zero
    assert cfg(io, 0, 0x00) == 0x12378086               # i440FX, Intel
    assert cfg(io, 0, 0x08) >> 8 == 0x060000            # host bridge class
    assert slot == 1
    assert cfg(io, slot, 0x00) == 0x56781234
    assert cfg(io, slot, 0x02, 2) == 0x5678
    assert cfg(io, slot, 0x08) == 0x02000003
    assert cfg(io, slot, 0x0E, 1) == 0                 # header type 0, single function
    assert cfg(io, slot, 0x3C, 1) == intx_gsi(slot)   # interrupt line as firmware set it
    assert cfg(io, slot, 0x3D, 1) == 1                 # INTA#
    assert cfg(io, 5, 0x00) == 0xFFFFFFFF                     # empty slot
    assert cfg(io, slot, 0x00, func=1) == 0xFFFFFFFF          # no function 1
    assert cfg(io, slot, 0x00, bus=1) == 0xFFFFFFFF           # no bus 1
    assert cfg(io, slot, 0x00, enable=False) == 0xFFFFFFFF    # enable bit clear


def test_read_only_registers_ignore_writes():
    io, _, _, fn, slot, *_ = make()
    cfg_write(io, slot, 0x00, 4, 0)
    cfg_write(io, slot, 0x08, 4, 0)
    cfg_write(io, slot, 0x3D, 1, 4)
    assert cfg(io, slot, 0x00) == 0x56781234 and cfg(io, slot, 0x08) == 0x02000003
    assert cfg(io, slot, 0x3D, 1) == 1
    cfg_write(io, slot, 0x3C, 1, 0x0B)
    assert cfg(io, slot, 0x3C, 1) == 0x0B


def test_bars_are_placed_sized_and_decode():
    io, mmio, bridge, fn, slot, target, ports = make()
    bar0 = cfg(io, slot, 0x10)
    assert MMIO_WINDOW[0] <= bar0 < MMIO_WINDOW[1] and bar0 % 0x1000 == 0 and bar0 & 0xF == 0
    bar2 = cfg(io, slot, 0x18)
    assert bar2 & 0xF == 0xC and bar2 % 0x4000 == 0xC     # 64-bit, prefetchable
    io_bar = cfg(io, slot, 0x20)
    assert io_bar & 1 and 0xC000 <= io_bar < 0x10000
    assert cfg(io, slot, 0x04, 2) & 3 == 3                # I/O and memory decode on
    assert mmio.read(bar0 + 8, 4) == 0x1008
    io.write(io_bar - 1 + 5, 1, 0x5A)
    assert ports.writes == [(5, 1, 0x5A)]
    # sizing: all-ones in, size mask and flags out
    cfg_write(io, slot, 0x10, 4, 0xFFFFFFFF)
    assert cfg(io, slot, 0x10) == 0xFFFFF000
    cfg_write(io, slot, 0x18, 4, 0xFFFFFFFF)
    cfg_write(io, slot, 0x1C, 4, 0xFFFFFFFF)
    assert cfg(io, slot, 0x18) == 0xFFFFC00C and cfg(io, slot, 0x1C) == 0xFFFFFFFF
    cfg_write(io, slot, 0x20, 4, 0xFFFFFFFF)
    assert cfg(io, slot, 0x20) == 0xFFFFFFE1


def test_moving_a_bar_moves_its_range_on_the_bus():
    io, mmio, bridge, fn, slot, target, _ = make()
    old = cfg(io, slot, 0x10)
    cfg_write(io, slot, 0x10, 4, 0xE8000000)
    assert bridge.mapping(slot, 0) == 0xE8000000
    assert mmio.read(old, 4) == 0xFFFFFFFF                # nothing there any more
    assert mmio.read(0xE8000010, 4) == 0x1010
    cfg_write(io, slot, 0x04, 2, 0)                       # decode off: every BAR leaves the bus
    assert mmio.read(0xE8000010, 4) == 0xFFFFFFFF and bridge.mapping(slot, 0) is None
    cfg_write(io, slot, 0x04, 2, 2)
    assert mmio.read(0xE8000010, 4) == 0x1010
    # a 64-bit BAR above 4 GiB
    cfg_write(io, slot, 0x18, 4, 0x40000000)
    cfg_write(io, slot, 0x1C, 4, 0x1)
    assert bridge.mapping(slot, 2) == 0x1_4000_0000 and mmio.read(0x1_4000_0004, 4) == 0x1004


def test_a_bar_moved_onto_a_taken_range_stays_unmapped_until_moved_again():
    io, mmio, bridge, fn, slot, *_ = make()
    mmio.insert(0xF0000000, 0x1000, Regs(), "other")
    cfg_write(io, slot, 0x10, 4, 0xF0000000)
    assert bridge.mapping(slot, 0) is None
    cfg_write(io, slot, 0x10, 4, 0xF0001000)
    assert bridge.mapping(slot, 0) == 0xF0001000


def test_capability_list():
    io, _, _, fn, slot, *_ = make()
    assert cfg(io, slot, 0x06, 2) & 0x10                  # capabilities list present
    ptr = cfg(io, slot, 0x34, 1)
    assert ptr == 0x40 and cfg(io, slot, ptr) == 0x09 | 0 << 8 | 0x04 << 16 | ord('a') << 24  # id, next, body
    assert cfg(io, slot, ptr + 1, 1) == 0                 # the last one


def test_add_bar_and_capability_refuse_bad_input():
    fn = PciFunction(1, 2, 0)
    with pytest.raises(ConfigError):
        fn.add_bar(0, 0x1800, "mem32", Regs())
    with pytest.raises(ConfigError):
        fn.add_bar(5, 0x1000, "mem64", Regs())
    fn.add_bar(0, 0x1000, "mem64", Regs())
    with pytest.raises(ConfigError):
        fn.add_bar(1, 0x1000, "mem32", Regs())
    with pytest.raises(ConfigError):
        for _ in range(100):
            fn.add_capability(9, bytes(30))


def test_bridge_and_function_state_round_trip():
    io, mmio, bridge, fn, slot, *_ = make()
    cfg_write(io, slot, 0x10, 4, 0xE9000000)
    state, bstate = fn.save(), bridge.save()
    cfg_write(io, slot, 0x10, 4, 0xEA000000)
    fn.restore(state)
    bridge.restore(bstate)
    assert bridge.mapping(slot, 0) == 0xE9000000
    with pytest.raises(DeviceStateError):
        fn.restore({"version": 1, "config": "00"})
    assert bridge.mapping(slot, 0) == 0xE9000000
    fn.reset()
    assert bridge.mapping(slot, 0) != 0xE9000000


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    follow = data[0] >> 6
    if not follow:
        return data[0] & 0x3F, 1
    value = data[0] & 0xF
    for i in range(follow):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + follow


@pytest.mark.parametrize("n", [0, 1, 62, 63, 64, 300, 4000, 4094, 70000])
def test_pkg_length_counts_itself(n):
    enc = aml.pkg_length(n)
    assert decode_pkg_length(enc) == (n + len(enc), len(enc))


def test_dsdt_describes_the_root_bridge_and_its_routing():
    memory = GuestMemory(16 << 20)
    acpi.write_acpi_tables(memory, 1, aml.pci_root_aml())
    rsdp = memory.read(acpi.RSDP_ADDR, 36)
    xsdt = struct.unpack_from("<Q", rsdp, 24)[0]
    fadt = struct.unpack_from("<Q", memory.read(xsdt + 36, 8))[0]
    dsdt = struct.unpack_from("<Q", memory.read(fadt + 140, 8))[0]
    length = struct.unpack_from("<I", memory.read(dsdt + 4, 4))[0]
    table = memory.read(dsdt, length)
    assert table[:4] == b"DSDT" and sum(table) & 0xFF == 0
    body = table[36 + len(acpi.S5_AML):]
    assert body[0] == aml.SCOPE_OP
    scope_len, n = decode_pkg_length(body[1:])
    assert scope_len + 1 == len(body)                    # the scope spans the rest exactly
    assert body[1 + n:1 + n + 5] == b"\\_SB_"
    dev = body[1 + n + 5:]
    assert dev[:2] == bytes([0x5B, 0x82])
    dev_len, m = decode_pkg_length(dev[2:])
    assert dev[2 + m:2 + m + 4] == b"PCI0"
    mres = dev[2 + dev_len:]                             # the motherboard resources follow PCI0
    mres_len, j = decode_pkg_length(mres[2:])
    assert mres[:2] == bytes([0x5B, 0x82]) and mres_len + 2 == len(mres) and mres[2 + j:2 + j + 4] == b"MRES"
    assert b"_HID\x0c\x41\xd0\x0c\x02" in mres            # EisaId("PNP0C02")
    assert aml.ecam_reservation() in mres
    dev = dev[:2 + dev_len]
    assert b"_HID\x0c\x41\xd0\x0a\x03" in dev             # EisaId("PNP0A03")
    prt = dev[dev.index(b"_PRT") + 4:]
    assert prt[0] == aml.PACKAGE_OP
    _, k = decode_pkg_length(prt[1:])
    assert prt[1 + k] == 31 * 4
    first = prt[2 + k:]                                  # Package{0x0001FFFF, 0, 0, gsi}
    assert first[:2] == bytes([aml.PACKAGE_OP, 11]) and first[2] == 4
    assert first[3:8] == b"\x0c\xff\xff\x01\x00" and first[8:10] == b"\x00\x00"
    assert first[10:12] == bytes([aml.BYTE_PREFIX, intx_gsi(1)])
    crs = aml.root_resources()
    assert crs[-2:] == b"\x79\x00" and b"\x87\x17\x00\x00\x0c\x01" in crs


def test_virtio_function_identity_and_capabilities():
    from pyvmm.devices.virtio.rng import VirtioRng
    d = Driver(VirtioRng)
    assert d.cfg_read(0x00) == 0x1044_1AF4                # modern virtio-rng
    assert d.cfg_read(0x08) & 0xFF == 1                   # revision 1
    assert d.cfg_read(0x2C) == 0x1100_1AF4
    assert set(d.caps) == {1, 2, 3}                        # no device config for rng
    assert all(bar == 4 for bar, _, _ in d.caps.values())
    assert d.bar_base(4) >= MMIO_WINDOW[0]


def ecam_addr(slot, reg, func=0, bus=0):
    return ECAM_BASE + (bus << 20 | slot << 15 | func << 12 | reg)


def test_ecam_reads_the_same_config_space_as_ports_cf8_cfc():
    io, mmio, bridge, fn, slot, *_ = make()
    for s in (0, slot):
        for reg in range(0, 256, 4):
            assert mmio.read(ecam_addr(s, reg), 4) == cfg(io, s, reg), (s, reg)
    assert mmio.read(ecam_addr(slot, 0x02), 2) == 0x5678
    assert mmio.read(ecam_addr(slot, 0x0B), 1) == 0x02          # class: network
    assert mmio.read(ecam_addr(slot, 0x00), 8) == cfg(io, slot, 0) | cfg(io, slot, 4) << 32


def test_ecam_extended_space_is_an_empty_capability_list():
    io, mmio, bridge, *_ = make()
    assert mmio.read(ecam_addr(0, 0x100), 4) == 0               # no extended capabilities
    assert mmio.read(ecam_addr(0, 0xFFC), 4) == 0
    mmio.write(ecam_addr(0, 0x100), 4, 0x12345678)              # ignored
    assert mmio.read(ecam_addr(0, 0x100), 4) == 0
    assert bridge.ecam.reads >= 3 and bridge.ecam.writes == 1


def test_ecam_absent_functions_and_slots_read_all_ones():
    io, mmio, bridge, fn, slot, *_ = make()
    assert mmio.read(ecam_addr(slot, 0, func=1), 4) == 0xFFFFFFFF
    assert mmio.read(ecam_addr(slot + 1, 0), 2) == 0xFFFF
    assert mmio.read(ecam_addr(slot + 1, 0x100), 4) == 0xFFFFFFFF
    with pytest.raises(Exception):
        mmio.insert(ECAM_BASE + ECAM_SIZE - 0x1000, 0x1000, Regs())   # the window is taken
    assert MMIO_WINDOW[0] >= ECAM_BASE + ECAM_SIZE                # BARs never land in it


def test_ecam_write_moves_a_bar_like_the_ports_do():
    io, mmio, bridge, fn, slot, target, _ = make()
    new = MMIO_WINDOW[0] + 0x100000
    mmio.write(ecam_addr(slot, 0x10), 4, new)
    assert cfg(io, slot, 0x10) == new
    assert bridge.mapping(slot, 0) == new
    mmio.write(new + 8, 4, 7)
    assert target.writes[-1] == (8, 4, 7)
    mmio.write(ecam_addr(slot, 0x04), 2, 0)                     # decoding off through ECAM
    assert bridge.mapping(slot, 0) is None


def test_mcfg_names_the_ecam_window_for_bus_0():
    memory = GuestMemory(16 << 20)
    acpi.write_acpi_tables(memory, 1, aml.pci_root_aml(), (acpi.build_mcfg(ECAM_BASE, 0, 0),))
    rsdp = memory.read(acpi.RSDP_ADDR, 36)
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt = memory.read(xsdt_addr, struct.unpack_from("<I", memory.read(xsdt_addr + 4, 4))[0])
    rsdt_addr = struct.unpack_from("<I", rsdp, 16)[0]
    rsdt = memory.read(rsdt_addr, struct.unpack_from("<I", memory.read(rsdt_addr + 4, 4))[0])
    assert sum(xsdt) & 0xFF == 0 and sum(rsdt) & 0xFF == 0
    entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert list(struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36)) == list(entries)
    tables = {memory.read(a, 4): a for a in entries}
    assert set(tables) == {b"FACP", b"APIC", b"MCFG"}
    mcfg = memory.read(tables[b"MCFG"], 60)
    assert struct.unpack_from("<I", mcfg, 4)[0] == 60 and sum(mcfg) & 0xFF == 0
    assert mcfg[36:44] == bytes(8)
    assert struct.unpack_from("<QHBB", mcfg, 44) == (ECAM_BASE, 0, 0, 0)


def test_machine_with_virtio_has_ecam_and_mcfg(tmp_path):
    from pyvmm.boot import entry
    from pyvmm.boot.result import BootResult
    from pyvmm.builder import build_machine, destroy_machine
    from pyvmm.config import DriveConfig, VmConfig
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(4096))

    def boot(memory):
        memory.write(0x100000, b"\xf4")                          # hlt
        return BootResult(entry.protected_mode_32(memory, 0x100000), "raw-prot")

    m = build_machine(VmConfig(mem_mib=32, no_reboot=True, engine="bt",
                               drives=[DriveConfig(file=str(disk), format="raw")]), lambda b: None, boot=boot)
    try:
        assert m.mmio_bus.read(ECAM_BASE, 4) == 0x1237_8086            # the host bridge
        assert m.mmio_bus.read(ECAM_BASE + (1 << 15), 4) == 0x1042_1AF4   # virtio-blk in slot 1
        xsdt_addr = struct.unpack_from("<Q", m.memory.read(acpi.RSDP_ADDR, 36), 24)[0]
        length = struct.unpack_from("<I", m.memory.read(xsdt_addr + 4, 4))[0]
        entries = struct.unpack_from(f"<{(length - 36) // 8}Q", m.memory.read(xsdt_addr, length), 36)
        mcfg = [a for a in entries if m.memory.read(a, 4) == b"MCFG"]
        assert len(mcfg) == 1 and struct.unpack_from("<Q", m.memory.read(mcfg[0] + 44, 8))[0] == ECAM_BASE
    finally:
        destroy_machine(m)
