"""PVH: probing by the Xen PHYS32_ENTRY note, hvm_start_info, and the test
guest tests/guests/pvh_info.S (loaded, run in Unicorn against fw_cfg and the
ACPI tables, and end to end under KVM when the CLI is ready)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pyvmm.boot import acpi, layout, pvh
from pyvmm.config import VmConfig
from pyvmm.cpu import CR0_PE, CR0_PG
from pyvmm.devices.fw_cfg import PORT_RANGE, FwCfg
from pyvmm.errors import ImageError
from pyvmm.memory import GuestMemory
from tests.asm import assemble, elf_image, emulate32
from tests.test_multiboot import ENGINES, run_vm

GUESTS = Path(__file__).parent / "guests"
MIB = 1 << 20
ENTRY = 0x100010
CODE = b"\x90" * 16 + b"\xf4" * 16


def pvh_note(entry: int = ENTRY, size: int = 4) -> tuple[str, int, bytes]:
    return ("Xen", 18, entry.to_bytes(size, "little"))


def image(notes=None, **kw) -> bytes:
    return elf_image([(0x100000, 0x100000, CODE, 0x2000)], 0x100000,
                     notes=[pvh_note()] if notes is None else notes, **kw)


@pytest.fixture
def mem():
    m = GuestMemory(64 * MIB)
    yield m
    m.close()


def cstring(mem: GuestMemory, addr: int) -> str:
    raw = mem.read(addr, 256)
    return raw[:raw.index(b"\0")].decode()


def test_probe():
    assert pvh.probe(image())
    assert pvh.probe(image(elf64=True, notes=[pvh_note(size=8)]))
    assert not pvh.probe(image(notes=[("Xen", 17, b"\0" * 4)]))          # other Xen note
    assert not pvh.probe(image(notes=[("GNU", 18, b"\0" * 4)]))          # other owner
    assert not pvh.probe(image(notes=[pvh_note(), ("Linux", 0x100, b"salt")]))
    assert not pvh.probe(image(notes=[pvh_note(), ("Xen", 6, b"linux\0")]))
    assert not pvh.probe(b"\x7fELF" + bytes(60))
    assert not pvh.probe(b"MZ" + bytes(100))


def test_load_and_start_info(mem, tmp_path):
    mods = []
    for name, data in (("one", b"FIRST-MODULE"), ("two", b"2" * 5000)):
        path = tmp_path / name
        path.write_bytes(data)
        mods.append(path)
    cfg = VmConfig(kernel="k", initrd=[str(m) for m in mods], cmdline="console=ttyS0 exit=5")
    result = pvh.load(mem, cfg, image())
    assert result.protocol == "pvh"
    cpu = result.cpu
    assert cpu.rip == ENTRY and cpu.regs["rbx"] == layout.PROTOCOL_INFO_ADDR
    assert cpu.cr0 & CR0_PE and not cpu.cr0 & CR0_PG and not cpu.long_mode
    assert cpu.cs.db == 1 and cpu.cs.limit == 0xFFFFFFFF
    assert mem.read(0x100000, len(CODE)) == CODE
    assert mem.read(0x100000 + len(CODE), 0x2000 - len(CODE)) == bytes(0x2000 - len(CODE))

    (magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, memmap_entries,
     _res) = pvh.START_INFO.unpack(mem.read(layout.PROTOCOL_INFO_ADDR, pvh.START_INFO.size))
    assert (magic, version, flags, nr_modules) == (0x336EC578, 1, 0, 2)
    assert cstring(mem, cmdline) == "console=ttyS0 exit=5"
    assert rsdp == acpi.RSDP_ADDR
    entries = [pvh.MEMMAP_ENTRY.unpack(mem.read(memmap + 24 * i, 24)) for i in range(memmap_entries)]
    assert [(a, s, t) for a, s, t, _ in entries] == layout.e820_map(mem.ram_ranges())
    (p1, s1, c1, _), (p2, s2, c2, _) = \
        [pvh.MODLIST_ENTRY.unpack(mem.read(modlist + 32 * i, 32)) for i in range(2)]
    assert p1 == 0x102000 and s1 == 12 and mem.read(p1, 12) == b"FIRST-MODULE"
    assert p2 == 0x103000 and s2 == 5000 and p2 % 0x1000 == 0
    assert cstring(mem, c1) == str(mods[0]) and cstring(mem, c2) == str(mods[1])


def test_no_modules(mem):
    pvh.load(mem, VmConfig(), image())
    nr, modlist = struct.unpack_from("<IQ", mem.read(layout.PROTOCOL_INFO_ADDR + 12, 12))
    assert (nr, modlist) == (0, 0)


def test_errors(mem):
    with pytest.raises(ImageError, match="no Xen PHYS32_ENTRY"):
        pvh.load(mem, VmConfig(), image(notes=[]))
    with pytest.raises(ImageError, match="entry 0x300000 is outside"):
        pvh.load(mem, VmConfig(), image(notes=[pvh_note(0x300000)]))
    with pytest.raises(ImageError, match="not an ELF"):
        pvh.load(mem, VmConfig(), b"nope" * 20)
    far = elf_image([(0x5000000, 0x5000000, CODE, 0x100)], 0x5000000, notes=[pvh_note(0x5000000)])
    small = GuestMemory(16 * MIB)
    try:
        with pytest.raises(ImageError, match="outside guest RAM"):
            pvh.load(small, VmConfig(), far)
    finally:
        small.close()


# ----------------------------------------------------------- the real guest
@pytest.fixture(scope="module")
def guest() -> Path:
    return assemble(GUESTS / "pvh_info.S", fmt="elf32", ld_script=GUESTS / "guest.ld")


def test_guest_builds_and_probes(mem, guest):
    data = guest.read_bytes()
    assert pvh.probe(data)
    result = pvh.load(mem, VmConfig(cmdline="exit=5"), data)
    assert result.cpu.rip == struct.unpack_from("<I", data, 24)[0]   # _start carries the note


def test_guest_runs_in_unicorn(mem, guest, tmp_path):
    module = tmp_path / "module.txt"
    module.write_bytes(b"HELLO-PVH module")
    result = pvh.load(mem, VmConfig(initrd=[str(module)], cmdline="exit=7", mem_mib=64, cpus=2),
                      guest.read_bytes())
    acpi.write_acpi_tables(mem, 2)
    fw_cfg = FwCfg(ram_size=64 * MIB, cpus=2, memory=mem)
    out, code = emulate32(mem, result.cpu, [(0x510, PORT_RANGE, fw_cfg)])
    assert out.splitlines() == [
        "magic=ok",
        "version=1",
        "cmdline=exit=7",
        "mods=1",
        "mod0=HELLO-PV",
        f"memmap={len(layout.e820_map(mem.ram_ranges()))}",
        "rsdp=RSD PTR ",
        "fw_cfg_dma=QEMU",
        "fw_cfg=QEMU",
        "cpus=2",
        "ram=64M",
        "exit=7",
    ]
    assert code == 7
    assert fw_cfg.dma_transfers == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_guest_end_to_end(guest, tmp_path, engine):
    module = tmp_path / "module.txt"
    module.write_bytes(b"HELLO-PVH module")
    proc = run_vm(guest, [module], "exit=5", engine)
    out = proc.stdout.decode("latin-1")
    assert proc.returncode == (5 << 1) | 1, out + proc.stderr.decode("latin-1")
    for line in ("magic=ok", "version=1", "cmdline=exit=5", "mods=1", "mod0=HELLO-PV",
                 "rsdp=RSD PTR ", "fw_cfg_dma=QEMU", "fw_cfg=QEMU", "cpus=2", "ram=64M", "exit=5"):
        assert line in out.splitlines()
