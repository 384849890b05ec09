"""IDE bus-master DMA: the PIIX bus-master block (BAR 4) and READ/WRITE
DMA (and EXT) on the primary channel, driven through the I/O bus as a
driver does, against a real raw image and a GuestMemory; IRQ 14 and the
bus-master status observed.  Hostile PRD tables end in error status."""

from __future__ import annotations

import os
import random
import struct

import pytest

from pyvmm.bus import Bus
from pyvmm.devices.ide.ata import ABRT, DRDY, DRQ, ERR
from pyvmm.devices.ide.busmaster import ACTIVE, ERROR, INTERRUPT, START, TO_MEMORY
from pyvmm.devices.ide.piix import PRIMARY_IRQ, piix_ide_function, place_primary_channel
from pyvmm.irq import IrqLine
from pyvmm.memory import GuestMemory
from pyvmm.storage.image import open_image
from pyvmm.storage.raw import RawImage
from tests.devices.test_ide import CMD, CTL, SECTORS, task

BM = 0xC000
RAM = 4 << 20
DSC = 0x10
TABLE = 0x1000


class Rig:
    """A channel, its bus master with PCI bus mastering on, 4 MiB of RAM."""

    def __init__(self, path: str, readonly: bool = False, memory: GuestMemory | None = None):
        self.path = path
        self.memory = memory or GuestMemory(RAM)
        self.bus = Bus("io")
        self.irq = IrqLine(PRIMARY_IRQ)
        self.channel = place_primary_channel(self.bus, self.irq, open_image(path, "raw", readonly=readonly))
        self.function, self.bm = piix_ide_function(self.memory)
        self.bm.attach(0, self.channel)
        self.bus.insert(BM, 16, self.bm, "ide-bus-master")
        self.function.config_write(4, 2, 0x0005)        # I/O decode and bus mastering

    def prd(self, entries, table: int = TABLE) -> None:
        """Writes PRD entries (address, byte count, eot) at `table` and points the engine there."""
        for i, (address, count, eot) in enumerate(entries):
            self.memory.write(table + 8 * i, struct.pack("<II", address, (count & 0xFFFF) | (eot << 31)))
        self.bus.write(BM + 4, 4, table)

    def start(self, to_memory: bool) -> None:
        self.bus.write(BM, 1, START | (TO_MEMORY if to_memory else 0))

    def bm_status(self) -> int:
        return self.bus.read(BM + 2, 1)

    def ata_status(self) -> int:
        return self.bus.read(CMD + 7, 1)


def disk(tmp_path, size: int = SECTORS * 512) -> str:
    path = str(tmp_path / "disk.raw")
    RawImage.create(path, size)
    return path


def put(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def get(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


@pytest.mark.parametrize("start_first", [False, True])
def test_read_dma_scatters_over_the_prd_buffers_and_interrupts(tmp_path, start_first):
    rig = Rig(disk(tmp_path))
    data = os.urandom(3 * 512)
    put(rig.path, 5 * 512, data)
    pieces = [(0x20000, 100), (0x30002, 1000), (0x40000, 436)]    # split across sectors, a word-aligned one
    rig.prd([(a, n, i == len(pieces) - 1) for i, (a, n) in enumerate(pieces)])
    if start_first:
        rig.start(to_memory=True)
        assert rig.bm_status() == ACTIVE and rig.irq.level == 0
    task(rig.bus, 5, 3, 0xC8)
    if not start_first:
        assert rig.irq.level == 0 and rig.bus.read(CTL, 1) == DRDY | DSC | DRQ   # waiting for the engine
        assert rig.memory.read(0x20000, 100) == bytes(100)
        rig.start(to_memory=True)
    assert rig.irq.level == 1
    assert rig.bm_status() == INTERRUPT                     # done: not active, no error
    assert rig.ata_status() == DRDY | DSC and rig.irq.level == 0
    got = b"".join(rig.memory.read(a, n) for a, n in pieces)
    assert got == data
    assert rig.memory.read(0x30000, 2) == bytes(2) and rig.memory.read(0x20000 + 100, 2) == bytes(2)
    rig.bus.write(BM + 2, 1, INTERRUPT)                     # write 1 to clear
    assert rig.bm_status() == 0


def test_write_dma_ext_gathers_from_ram_above_28_bits(tmp_path):
    """130 sectors (more than one 64 KiB disk chunk) from a 64 KiB entry
    (count 0) and a 1 KiB one, to an LBA above 2^28."""
    rig = Rig(disk(tmp_path, (1 << 28) * 512 + 256 * 512))     # sparse
    lba = (1 << 28) + 3
    data = os.urandom(130 * 512)
    rig.memory.write(0x100000, data[:65536])
    rig.memory.write(0x200000, data[65536:])
    rig.prd([(0x100000, 0, False), (0x200000, 1024, True)])
    task(rig.bus, lba, 130, 0x35, ext=True)
    rig.start(to_memory=False)
    assert rig.irq.level == 1 and rig.bm_status() == INTERRUPT
    assert rig.ata_status() == DRDY | DSC
    assert get(rig.path, lba * 512, len(data)) == data
    assert get(rig.path, (lba - 1) * 512, 512) == bytes(512)


def test_prd_table_longer_than_the_request_leaves_the_engine_active(tmp_path):
    rig = Rig(disk(tmp_path))
    put(rig.path, 0, b"\xAB" * 512)
    rig.prd([(0x20000, 4096, True)])
    task(rig.bus, 0, 1, 0xC8)
    rig.start(to_memory=True)
    assert rig.bm_status() == ACTIVE | INTERRUPT             # the driver must stop it
    assert rig.memory.read(0x20000, 513) == b"\xAB" * 512 + b"\0"
    rig.bus.write(BM, 1, TO_MEMORY)                          # start cleared
    assert rig.bm_status() == INTERRUPT


HOSTILE = {
    "table outside RAM": lambda rig: rig.bus.write(BM + 4, 4, 0xFFFFFFF0),
    "table straddles the end of RAM": lambda rig: (rig.memory.write(RAM - 4, struct.pack("<I", 0x20000)),
                                                   rig.bus.write(BM + 4, 4, RAM - 4)),
    "buffer outside RAM": lambda rig: rig.prd([(0xFEE00000, 1024, True)]),
    "buffer straddles the end of RAM": lambda rig: rig.prd([(RAM - 512, 1024, True)]),
    "table ends too soon": lambda rig: rig.prd([(0x20000, 512, False), (0x30000, 510, True)]),
    "direction contradicts the command": lambda rig: rig.prd([(0x20000, 1024, True)]),
}


@pytest.mark.parametrize("why", sorted(HOSTILE))
@pytest.mark.parametrize("cmd", [0xC8, 0xCA])
def test_hostile_prd_tables_end_in_error_status_and_move_nothing(tmp_path, why, cmd):
    rig = Rig(disk(tmp_path))
    writing = cmd == 0xCA
    put(rig.path, 0, b"\x5A" * 1024)
    rig.memory.write(0x20000, b"\xC3" * 1024)
    HOSTILE[why](rig)
    task(rig.bus, 0, 2, cmd)
    contradicts = why.startswith("direction")
    rig.start(to_memory=(not writing) != contradicts)
    assert rig.irq.level == 1
    assert rig.bm_status() == ERROR | INTERRUPT
    assert rig.ata_status() == DRDY | DSC | ERR and rig.bus.read(CMD + 1, 1) == ABRT
    assert get(rig.path, 0, 1024) == b"\x5A" * 1024
    assert rig.memory.read(0x20000, 1024) == b"\xC3" * 1024
    assert rig.bm.errors == 1 and rig.bm.transfers == 0
    # the channel and the engine still work afterwards
    rig.bus.write(BM, 1, 0)
    rig.bus.write(BM + 2, 1, ERROR | INTERRUPT)
    rig.prd([(0x50000, 1024, True)], table=0x2000)
    task(rig.bus, 0, 2, 0xC8)
    rig.start(to_memory=True)
    assert rig.bm_status() == INTERRUPT and rig.memory.read(0x50000, 1024) == b"\x5A" * 1024


def test_a_table_with_no_end_in_64_kib_is_an_error(tmp_path):
    """8192 two-byte entries (a whole 64 KiB table) carry 16 KiB, short of
    a 33-sector read: the engine reads no entry past the table."""
    rig = Rig(disk(tmp_path))
    rig.prd([(0x20000, 2, False)] * 8192)
    rig.memory.write(TABLE + 0x10000, struct.pack("<II", 0x30000, 0x8000_0000))  # would end it, too late
    task(rig.bus, 0, 33, 0xC8)
    rig.start(to_memory=True)
    assert rig.bm_status() == ERROR | INTERRUPT and rig.ata_status() & ERR


def test_no_transfer_without_pci_bus_mastering_or_on_a_readonly_disk(tmp_path):
    rig = Rig(disk(tmp_path), readonly=True)
    put(rig.path, 0, b"\x11" * 512)
    rig.function.config_write(4, 2, 0x0001)                  # bus mastering off
    rig.prd([(0x20000, 512, True)])
    task(rig.bus, 0, 1, 0xC8)
    rig.start(to_memory=True)
    assert rig.irq.level == 0 and rig.bus.read(CTL, 1) == DRDY | DSC | DRQ
    assert rig.memory.read(0x20000, 512) == bytes(512)
    rig.bus.write(BM, 1, 0)
    task(rig.bus, 0, 1, 0xCA)                                # WRITE DMA to a read-only disk
    assert rig.ata_status() & ERR and rig.bus.read(CMD + 1, 1) == ABRT


def test_save_restore_with_a_dma_command_waiting(tmp_path):
    rig = Rig(disk(tmp_path))
    data = os.urandom(4 * 512)
    put(rig.path, 40 * 512, data)
    rig.prd([(0x60000, 2048, True)])
    rig.bus.write(BM, 1, TO_MEMORY)                          # direction set, not started
    task(rig.bus, 40, 4, 0x25, ext=True)
    states = rig.channel.save(), rig.bm.save(), rig.memory.read(0, 0x10000)
    task(rig.bus, 0, 1, 0xEC)                                # the source goes on to something else
    again = Rig(rig.path)
    again.memory.write(0, states[2])
    again.channel.restore(states[0])
    again.bm.restore(states[1])
    assert again.bus.read(CTL, 1) == DRDY | DSC | DRQ and again.bus.read(BM, 1) == TO_MEMORY
    again.start(to_memory=True)
    assert again.irq.level == 1 and again.bm_status() == INTERRUPT
    assert again.memory.read(0x60000, 2048) == data
    # a version-1 state (before DMA) still restores: nothing pending, the default mode
    old = {k: v for k, v in states[0].items() if k not in ("dma_pending", "mode")}
    again.channel.restore({**old, "version": 1})
    assert again.channel.dma_request() is None


def _identify(rig) -> tuple[int, ...]:
    rig.bus.write(CMD + 7, 1, 0xEC)
    return struct.unpack("<256H", rig.bus.read_many(CMD, 2, 256))


def _set_transfer_mode(rig, mode: int) -> int:
    rig.bus.write(CMD + 1, 1, 0x03)
    rig.bus.write(CMD + 2, 1, mode)
    rig.bus.write(CMD + 7, 1, 0xEF)
    return rig.ata_status()


def test_identify_offers_dma_modes_and_shows_the_one_set_features_selected(tmp_path):
    rig = Rig(disk(tmp_path))
    w = _identify(rig)
    assert w[49] & (1 << 8) and w[53] & (1 << 2)            # DMA; word 88 valid
    assert w[63] == 0x0407 and w[88] == 0x003F               # MWDMA 0-2 (2 selected), UDMA 0-5
    assert _set_transfer_mode(rig, 0x45) == DRDY | DSC       # UDMA 5
    w = _identify(rig)
    assert w[63] == 0x0007 and w[88] == 0x203F
    assert _set_transfer_mode(rig, 0x46) & ERR               # UDMA 6: not offered
    assert _set_transfer_mode(rig, 0x0C) == DRDY | DSC       # PIO 4: no DMA mode selected
    w = _identify(rig)
    assert w[63] == 0x0007 and w[88] == 0x003F
    # without a bus master: no DMA offered, none selectable, DMA commands abort
    plain = Rig(rig.path)
    plain.channel.dma_engine = None
    w = _identify(plain)
    assert not w[49] & (1 << 8) and w[63] == 0 and w[88] == 0
    assert _set_transfer_mode(plain, 0x22) & ERR
    task(plain.bus, 0, 1, 0xC8)
    assert plain.ata_status() & ERR and plain.bus.read(CMD + 1, 1) == ABRT


def test_hostile_register_traffic_never_raises(tmp_path):
    rig = Rig(disk(tmp_path))
    rng = random.Random(2021)
    for i in range(0, 0x400, 8):                             # a table of random entries, some in RAM
        rig.memory.write(TABLE + i, struct.pack("<II", rng.choice((rng.getrandbits(32), rng.randrange(RAM))),
                                                rng.getrandbits(32)))
    ports = [(CMD + i, 1) for i in range(1, 8)] + [(CTL, 1)] + [(BM + i, s) for i in range(16) for s in (1, 2, 4)]
    for _ in range(20000):
        port, size = rng.choice(ports)
        if port == CMD + 7 and rng.random() < 0.7:
            rig.bus.write(port, 1, rng.choice((0xC8, 0xCA, 0x25, 0x35, 0xEF)))
        elif port == BM + 4 and rng.random() < 0.5:
            rig.bus.write(BM + 4, 4, TABLE + 8 * rng.randrange(0x80))
        elif rng.random() < 0.5:
            rig.bus.write(port, size, rng.getrandbits(8 * size))
        else:
            rig.bus.read(port, size)
    assert rig.bm.transfers + rig.bm.errors > 0               # the traffic did reach the engine
    assert rig.bus.read(CTL, 1) & DRDY or rig.bus.read(CTL, 1) & 0x80


# --- the whole path: a raw guest as the driver, the board as install.py wires it -----

DMA_GUEST = """
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7000, %sp
    mov $0x80000000, %ebx         # find 8086:7010 on bus 0
1:  mov %ebx, %eax
    mov $0xCF8, %dx
    out %eax, %dx
    mov $0xCFC, %dx
    in %dx, %eax
    cmp $0x70108086, %eax
    je 2f
    add $0x800, %ebx
    cmp $0x80010000, %ebx
    jb 1b
    mov $0xEE, %al                # no IDE function
    out %al, $0xF4
    hlt
2:  lea 0x20(%ebx), %eax          # BAR 4 = 0xC000
    mov $0xCF8, %dx
    out %eax, %dx
    mov $0xCFC, %dx
    mov $0xC001, %eax
    out %eax, %dx
    lea 0x4(%ebx), %eax           # command: I/O decode, bus master
    mov $0xCF8, %dx
    out %eax, %dx
    mov $0xCFC, %dx
    mov $0x0005, %ax
    out %ax, %dx
    movl $0x2000, 0x1000          # one PRD entry: 1 KiB at 0x2000, EOT
    movl $0x80000400, 0x1004
    mov $0xC004, %dx
    mov $0x1000, %eax
    out %eax, %dx
    mov $0xC000, %dx              # direction: to memory
    mov $0x08, %al
    out %al, %dx
    mov $0x1F6, %dx               # READ DMA, LBA 1, 2 sectors
    mov $0xE0, %al
    out %al, %dx
    mov $0x1F2, %dx
    mov $2, %al
    out %al, %dx
    mov $0x1F3, %dx
    mov $1, %al
    out %al, %dx
    mov $0x1F4, %dx
    xor %al, %al
    out %al, %dx
    mov $0x1F5, %dx
    out %al, %dx
    mov $0x1F7, %dx
    mov $0xC8, %al
    out %al, %dx
    mov $0xC000, %dx              # start
    mov $0x09, %al
    out %al, %dx
    mov $0xC002, %dx
3:  in %dx, %al                   # until the interrupt bit
    test $0x04, %al
    jz 3b
    mov %al, 0x500
    mov $0x1F7, %dx
    in %dx, %al
    mov %al, 0x501
    xor %al, %al
    out %al, $0xF4
    hlt
"""


@pytest.mark.parametrize("engine", ["bt", pytest.param("hw", marks=pytest.mark.kvm)])
def test_a_guest_driver_reads_the_disk_by_dma(tmp_path, engine):
    from pyvmm.config import DriveConfig, VmConfig
    from pyvmm.machine import StopReason
    from tests.rawguest import build_guest, raw_boot, run_machine
    path = disk(tmp_path)
    data = os.urandom(1024)
    put(path, 512, data)
    cfg = VmConfig(mem_mib=16, engine=engine, debug_exit=(0xF4, 1), no_reboot=True,
                   ide_drives=[DriveConfig(path, "raw")])
    machine, _ = run_machine(cfg, raw_boot(build_guest(DMA_GUEST, "real"), "real"), timeout=60,
                             inspect=lambda m: (m.memory.read(0x500, 2), m.memory.read(0x2000, 1026)))
    status = machine.stop_status
    assert status.reason is StopReason.DEBUG_EXIT and status.value == 0, status
    bm_and_ata, got = machine.inspected
    assert bm_and_ata == bytes([INTERRUPT, DRDY | DSC])
    assert got == data + bytes(2)
