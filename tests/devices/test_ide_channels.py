"""Both IDE channels with disks in any of the four positions (master and
slave on 0x1F0/IRQ 14 and 0x170/IRQ 15), probed as Linux's libata and
SeaBIOS probe; and bus-master DMA whose disk work runs on an I/O thread
while the register write that starts it returns at once, with the event
loop finishing the transfer under the machine's lock."""

from __future__ import annotations

import os
import random
import struct
import threading
import time

import pytest

from pyvmm.bus import Bus
from pyvmm.devices.ide.ata import ABRT, DRDY, DRQ, ERR
from pyvmm.devices.ide.busmaster import ACTIVE, ERROR, INTERRUPT, START, TO_MEMORY
from pyvmm.devices.ide.piix import CHANNELS, piix_ide_function, place_channel
from pyvmm.devices.virtio.iothread import IoThread
from pyvmm.irq import IrqLine
from pyvmm.loop import EventLoop
from pyvmm.memory import GuestMemory
from pyvmm.storage.image import open_image
from pyvmm.storage.raw import RawImage

BM = 0xC000
RAM = 4 << 20
DSC = 0x10
SECTORS = 2048
POSITIONS = range(4)


class GatedImage:
    """A disk image whose reads and writes wait until `gate` opens, so a
    transfer stays in flight as long as a test needs."""

    def __init__(self, image):
        self.image = image
        self.gate = threading.Event()
        self.gate.set()
        self.size, self.readonly, self.path = image.size, image.readonly, image.path

    def read(self, offset: int, length: int) -> bytes:
        assert self.gate.wait(30)
        return self.image.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        assert self.gate.wait(30)
        self.image.write(offset, data)

    def flush(self) -> None:
        self.image.flush()


class Board:
    """The channels with disks at `positions` (index = bus * 2 + unit), the
    bus master with PCI bus mastering on, 4 MiB of RAM; with `io`, DMA disk
    work on an I/O thread and completions on a running event loop."""

    def __init__(self, tmp_path, positions=POSITIONS, io: bool = False):
        self.lock = threading.RLock()
        self.bus = Bus("io", self.lock)
        self.memory = GuestMemory(RAM)
        self.paths: dict[int, str] = {}
        images = [None] * 4
        for index in positions:
            self.paths[index] = path = str(tmp_path / f"disk{index}.raw")
            RawImage.create(path, SECTORS * 512)
            images[index] = GatedImage(open_image(path, "raw"))
        self.images = images
        decode = (bool(images[0] or images[1]), bool(images[2] or images[3]))
        self.function, self.bm = piix_ide_function(self.memory, decode)
        self.irqs = [IrqLine(irq) for _, _, irq in CHANNELS]
        self.channels = [None, None]
        for c in (0, 1):
            if decode[c]:
                self.channels[c] = place_channel(self.bus, c, self.irqs[c], images[2 * c], images[2 * c + 1])
                self.bm.attach(c, self.channels[c])
        self.bus.insert(BM, 16, self.bm, "ide-bus-master")
        self.function.config_write(4, 2, 0x0005)
        self.loop = self.io = None
        if io:
            self.loop = EventLoop(self.lock)
            self.loop.start()
            self.io = IoThread("test-ide-io")
            self.bm.use_io_thread(self.io, self.loop.call_soon_threadsafe, self.lock)

    def close(self) -> None:
        for image in self.images:
            if image is not None:
                image.gate.set()
        if self.io is not None:
            self.bm.stop_io()
            self.loop.close()
            assert self.io.errors == 0 and self.loop.errors == 0     # nothing raised off the test thread

    # --- a driver's view --------------------------------------------------------------

    @staticmethod
    def ports(index: int) -> tuple[int, int, int, int]:
        """(command block, control block, bus-master base, device register value) of a position."""
        command, control, _ = CHANNELS[index // 2]
        return command, control, BM + 8 * (index // 2), 0xE0 | (0x10 if index % 2 else 0)

    def select(self, index: int) -> None:
        command, _, _, dev = self.ports(index)
        self.bus.write(command + 6, 1, dev)

    def task(self, index: int, lba: int, count: int, cmd: int) -> None:
        command, _, _, dev = self.ports(index)
        self.bus.write(command + 6, 1, dev | (lba >> 24) & 0xF)
        self.bus.write(command + 2, 1, count & 0xFF)
        for i, shift in ((3, 0), (4, 8), (5, 16)):
            self.bus.write(command + i, 1, lba >> shift)
        self.bus.write(command + 7, 1, cmd)

    def status(self, index: int) -> int:
        return self.bus.read(self.ports(index)[0] + 7, 1)

    def bm_status(self, index: int) -> int:
        return self.bus.read(self.ports(index)[2] + 2, 1)

    def dma(self, index: int, lba: int, count: int, address: int, to_memory: bool, table: int = 0x1000) -> None:
        """Programs one PRD entry, the ATA command and the start bit."""
        bm = self.ports(index)[2]
        self.memory.write(table, struct.pack("<II", address, (count * 512) & 0xFFFF | 1 << 31))
        self.bus.write(bm + 4, 4, table)
        self.bus.write(bm, 1, TO_MEMORY if to_memory else 0)
        self.task(index, lba, count, 0xC8 if to_memory else 0xCA)
        self.bus.write(bm, 1, START | (TO_MEMORY if to_memory else 0))

    def wait_interrupt(self, index: int, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while not (status := self.bm_status(index)) & INTERRUPT:
            assert time.monotonic() < deadline, f"no DMA interrupt: bus master status {status:#x}"
            time.sleep(0.002)
        return status

    def acknowledge(self, index: int) -> None:
        bm = self.ports(index)[2]
        self.bus.write(bm, 1, 0)
        self.bus.write(bm + 2, 1, ERROR | INTERRUPT)


@pytest.fixture
def board_factory(tmp_path):
    made = []

    def make(positions=POSITIONS, io: bool = False) -> Board:
        made.append(Board(tmp_path, positions, io))
        return made[-1]
    yield make
    for board in made:
        board.close()


def get(path: str, sector: int, count: int = 1) -> bytes:
    with open(path, "rb") as f:
        f.seek(sector * 512)
        return f.read(count * 512)


@pytest.mark.parametrize("io", [False, True], ids=["in-place", "io-thread"])
def test_all_four_positions_read_and_write_by_pio_and_dma(board_factory, io):
    board = board_factory(io=io)
    data = {i: os.urandom(6 * 512) for i in POSITIONS}
    for i in POSITIONS:
        command = board.ports(i)[0]
        irq, other = board.irqs[i // 2], board.irqs[1 - i // 2]
        board.task(i, 10, 2, 0x30)                                # PIO WRITE SECTORS
        for s in range(2):
            assert board.status(i) & DRQ
            board.bus.write_many(command, 2, data[i][512 * s:512 * (s + 1)])
        assert irq.level == 1 and other.level == 0
        assert board.status(i) == DRDY | DSC and irq.level == 0
        board.task(i, 10, 2, 0x20)                                # PIO READ SECTORS
        got = b""
        for _ in range(2):
            assert irq.level == 1 and board.status(i) & DRQ
            got += board.bus.read_many(command, 2, 256)
        assert got == data[i][:1024]
        board.memory.write(0x20000, data[i][1024:])
        board.dma(i, 20, 4, 0x20000, to_memory=False)             # WRITE DMA
        assert board.wait_interrupt(i) == INTERRUPT and irq.level == 1 and other.level == 0
        assert board.status(i) == DRDY | DSC
        board.acknowledge(i)
        board.dma(i, 20, 2, 0x30000 + 0x1000 * i, to_memory=True)  # READ DMA
        assert board.wait_interrupt(i) == INTERRUPT and board.status(i) == DRDY | DSC
        board.acknowledge(i)
        assert board.memory.read(0x30000 + 0x1000 * i, 1024) == data[i][1024:2048]
    for i in POSITIONS:                                           # each on its own disk, nowhere else
        assert get(board.paths[i], 10, 2) == data[i][:1024]
        assert get(board.paths[i], 20, 4) == data[i][1024:]
    words = {}
    for i in POSITIONS:
        board.task(i, 0, 0, 0xEC)
        words[i] = struct.unpack("<256H", board.bus.read_many(board.ports(i)[0], 2, 256))
        serial = bytes(b for w in words[i][10:20] for b in struct.pack(">H", w)).decode().strip()
        assert serial == f"PYVMM-ATA-{i}"
        assert words[i][93] & 0x0100 == (0x0100 if i % 2 else 0)  # word 93: the device-1 half is its own


def libata_probe(bus: Bus, command: int, control: int) -> set[int]:
    """The units Linux's ata_sff classification finds on a channel: after
    a soft reset, a unit whose Error reads 0, 1 (or 0x81 on unit 0) and
    whose signature says ATA is there unless its Status reads 0."""
    found = set()
    if bus.read(command + 7, 1) == 0xFF:
        return found                          # floating bus: no controller decodes these ports
    bus.write(control, 1, 0x06)               # SRST, nIEN
    bus.write(control, 1, 0x02)
    for unit in (0, 1):
        bus.write(command + 6, 1, 0xA0 | unit << 4)
        error = bus.read(command + 1, 1)
        if not (error in (0, 1) or (unit == 0 and error == 0x81)):
            continue
        if (bus.read(command + 4, 1), bus.read(command + 5, 1)) != (0, 0):
            continue
        if bus.read(command + 7, 1) != 0:
            found.add(unit)
    return found


def seabios_probe(bus: Bus, command: int) -> set[int]:
    """The units SeaBIOS's ata_detect keeps: the task file holds a pattern
    written with the unit selected, and its Status is not 0."""
    found = set()
    for unit in (0, 1):
        dh = 0xA0 | unit << 4
        bus.write(command + 6, 1, dh)
        for sc, sn in ((0x55, 0xAA), (0xAA, 0x55), (0x55, 0xAA)):
            bus.write(command + 2, 1, sc)
            bus.write(command + 3, 1, sn)
        bus.write(command + 6, 1, dh)
        if (bus.read(command + 6, 1), bus.read(command + 2, 1), bus.read(command + 3, 1)) != (dh, 0x55, 0xAA):
            continue
        if bus.read(command + 7, 1) != 0:
            found.add(unit)
    return found


@pytest.mark.parametrize("positions", [(0,), (1,), (0, 1), (2,), (3,), (0, 3), (1, 2), (0, 1, 2, 3)],
                         ids=lambda p: "+".join(map(str, p)))
def test_probes_see_exactly_the_disks_that_are_there(board_factory, positions):
    board = board_factory(positions)
    for c, (command, control, _) in enumerate(CHANNELS):
        want = {i % 2 for i in positions if i // 2 == c}
        assert seabios_probe(board.bus, command) == want
        assert libata_probe(board.bus, command, control) == want
        for unit in (0, 1):
            board.bus.write(command + 6, 1, 0xA0 | unit << 4)
            if unit not in want and want:
                assert board.bus.read(command + 7, 1) == 0 and board.bus.read(control, 1) == 0
                assert board.bus.read(command + 1, 1) == 0
                board.bus.write(command + 7, 1, 0xEC)             # goes nowhere
                assert board.irqs[c].level == 0 and board.bus.read(control, 1) == 0
    assert [bool(board.function.config_read(0x41 + 2 * c, 1) & 0x80) for c in (0, 1)] == \
        [any(i // 2 == c for i in positions) for c in (0, 1)]    # IDETIM decode: channels with disks


def test_intrq_belongs_to_the_unit_that_took_the_command(board_factory):
    board = board_factory((0, 1))
    irq = board.irqs[0]
    board.task(1, 0, 1, 0x20)                                     # READ SECTORS on the slave
    assert irq.level == 1
    board.select(0)                                               # the master drives no INTRQ ...
    assert irq.level == 0
    assert board.status(0) & DRQ and irq.level == 0              # ... and its Status read acknowledges none
    board.select(1)
    assert irq.level == 1 and board.status(1) & DRQ and irq.level == 0
    board.select(0)                                               # the data goes on from the slave's disk
    with open(board.paths[1], "r+b") as f:
        f.write(b"S" * 512)
    board.task(1, 0, 1, 0x20)
    board.select(0)
    assert board.bus.read_many(0x1F0, 2, 256) == b"S" * 512


def test_the_start_write_returns_at_once_and_the_io_thread_moves_the_data(board_factory):
    """With the disk held back, the access that sets start returns with the
    engine active and nothing moved; once the disk answers, the transfer
    (300 sectors: three pieces) completes on the event loop."""
    board = board_factory((0, 3), io=True)
    data = os.urandom(300 * 512)
    with open(board.paths[3], "r+b") as f:
        f.write(data)
    board.images[3].gate.clear()
    board.memory.write(0x1000, struct.pack("<IIIIII", 0x100000, 0, 0x200000, 0, 0x300000,
                                           0x8000_0000 | (300 * 512 - 0x20000)))
    board.bus.write(BM + 8 + 4, 4, 0x1000)
    board.bus.write(BM + 8, 1, TO_MEMORY)
    command = board.ports(3)[0]
    board.bus.write(command + 2, 1, 0x01)                        # READ DMA EXT: 300 sectors from LBA 0
    board.bus.write(command + 2, 1, 300 & 0xFF)
    for i in (3, 4, 5):
        board.bus.write(command + i, 1, 0)
        board.bus.write(command + i, 1, 0)
    board.bus.write(command + 6, 1, 0x50)
    board.bus.write(command + 7, 1, 0x25)
    started = threading.Thread(target=board.bus.write, args=(BM + 8, 1, START | TO_MEMORY))
    started.start()
    started.join(5)
    assert not started.is_alive(), "the start write waited for the disk"
    assert board.bm_status(3) == ACTIVE and board.irqs[1].level == 0
    assert board.bus.read(CHANNELS[1][1], 1) == DRDY | DSC | DRQ
    board.memory.write(0x1000, struct.pack("<II", RAM - 16, 0x8000_0010))   # rewriting the table now changes nothing
    time.sleep(0.05)
    assert board.memory.read(0x100000, 512) == bytes(512)
    board.images[3].gate.set()
    assert board.wait_interrupt(3) == INTERRUPT and board.irqs[1].level == 1
    assert board.status(3) == DRDY | DSC and board.irqs[1].level == 0
    assert (board.memory.read(0x100000, 0x10000) + board.memory.read(0x200000, 0x10000)
            + board.memory.read(0x300000, 300 * 512 - 0x20000)) == data
    assert board.memory.read(RAM - 16, 16) == bytes(16)
    assert board.bm.transfers == 1 and not board.bm.in_flight


def test_save_takes_a_transfer_in_flight_to_its_end_first(board_factory, tmp_path):
    board = board_factory((0,), io=True)
    data = os.urandom(200 * 512)
    with open(board.paths[0], "r+b") as f:
        f.write(data)
    board.images[0].gate.clear()
    board.memory.write(0x1000, struct.pack("<IIII", 0x100000, 0, 0x110000, 0x8000_0000 | (200 * 512 - 0x10000)))
    board.bus.write(BM + 4, 4, 0x1000)
    board.task(0, 0, 200, 0xC8)
    board.bus.write(BM, 1, START | TO_MEMORY)
    assert board.bm_status(0) == ACTIVE
    threading.Timer(0.2, board.images[0].gate.set).start()
    with board.lock:                                              # as a snapshot takes it: under the machine's lock
        channel_state, bm_state = board.channels[0].save(), board.bm.save()
        memory = board.memory.read(0x100000, 200 * 512)
    assert memory == data
    assert bytes.fromhex(bm_state["regs"])[2] == INTERRUPT
    assert channel_state["status"] == DRDY | DSC and not channel_state["dma_pending"]
    (tmp_path / "again").mkdir()
    again = Board(tmp_path / "again", (0,))
    again.channels[0].restore(channel_state)
    again.bm.restore(bm_state)
    assert again.irqs[0].level == 1 and again.bm_status(0) == INTERRUPT and again.status(0) == DRDY | DSC


def test_stop_or_a_new_command_abandons_the_transfer_in_flight(board_factory):
    board = board_factory((0,), io=True)
    with open(board.paths[0], "r+b") as f:
        f.write(b"\x77" * 1024)
    board.images[0].gate.clear()
    board.dma(0, 0, 2, 0x20000, to_memory=True)
    board.bus.write(BM, 1, TO_MEMORY)                             # start cleared mid-transfer
    assert board.bm_status(0) == 0
    board.images[0].gate.set()
    board.io.wait_idle(10)
    time.sleep(0.05)                                              # the loop drops the piece
    assert board.bm_status(0) == 0 and board.memory.read(0x20000, 1024) == bytes(1024)
    assert board.irqs[0].level == 0 and not board.bm.in_flight
    board.images[0].gate.clear()
    board.dma(0, 0, 2, 0x30000, to_memory=True)
    board.bus.write(0x1F7, 1, 0xEC)                               # IDENTIFY while the DMA is in flight
    board.images[0].gate.set()
    board.io.wait_idle(10)
    time.sleep(0.05)
    assert board.bm_status(0) & INTERRUPT == 0 and board.memory.read(0x30000, 1024) == bytes(1024)
    assert board.status(0) == DRDY | DSC | DRQ
    assert struct.unpack("<256H", board.bus.read_many(0x1F0, 2, 256))[60] == SECTORS
    assert board.status(0) == DRDY | DSC


HOSTILE = {
    "table outside RAM": lambda b: b.bus.write(BM + 8 + 4, 4, 0xFFFFFFF0),
    "table straddles the end of RAM": lambda b: b.bus.write(BM + 8 + 4, 4, RAM - 4),
    "buffer outside RAM": lambda b: b.memory.write(0x1000, struct.pack("<II", 0xFEE00000, 0x8000_0400)),
    "buffer straddles the end of RAM": lambda b: b.memory.write(0x1000, struct.pack("<II", RAM - 512, 0x8000_0400)),
    "no end in 64 KiB": lambda b: b.memory.write(0x1000, struct.pack("<II", 0x20000, 2) * 8192),
}


@pytest.mark.parametrize("why", sorted(HOSTILE))
@pytest.mark.parametrize("to_memory", [True, False], ids=["read", "write"])
def test_hostile_prd_tables_with_the_io_thread(board_factory, why, to_memory):
    board = board_factory((2,), io=True)
    with open(board.paths[2], "r+b") as f:
        f.write(b"\x5A" * 65 * 512)
    board.memory.write(0x20000, b"\xC3" * 1024)
    board.memory.write(RAM - 512, b"\xC3" * 512)
    board.bus.write(BM + 8 + 4, 4, 0x1000)
    HOSTILE[why](board)
    board.bus.write(BM + 8, 1, TO_MEMORY if to_memory else 0)
    board.task(2, 0, 65, 0xC8 if to_memory else 0xCA)
    board.bus.write(BM + 8, 1, START | (TO_MEMORY if to_memory else 0))
    assert board.wait_interrupt(2) == ERROR | INTERRUPT
    assert board.status(2) == DRDY | DSC | ERR and board.bus.read(0x171, 1) == ABRT
    assert get(board.paths[2], 0, 65) == b"\x5A" * 65 * 512
    assert board.memory.read(0x20000, 1024) == b"\xC3" * 1024 and board.memory.read(RAM - 512, 512) == b"\xC3" * 512
    assert board.io.jobs_run == 0                                 # no disk work was ever queued


def test_hostile_register_traffic_with_transfers_in_flight_never_raises(board_factory):
    board = board_factory(io=True)
    rng = random.Random(2126)
    for i in range(0, 0x400, 8):
        board.memory.write(0x1000 + i, struct.pack("<II", rng.choice((rng.getrandbits(32), rng.randrange(RAM))),
                                                   rng.getrandbits(32)))
    ports = ([(c + i, 1) for c in (0x1F0, 0x170) for i in range(1, 8)] + [(0x3F6, 1), (0x376, 1)]
             + [(BM + i, s) for i in range(16) for s in (1, 2, 4)])
    for n in range(20000):
        port, size = rng.choice(ports)
        if port & 7 == 7 and port < 0x200 and rng.random() < 0.7:
            board.bus.write(port, 1, rng.choice((0xC8, 0xCA, 0x25, 0x35, 0xEC)))
        elif port & ~8 == BM + 4 and rng.random() < 0.5:
            board.bus.write(port, 4, 0x1000 + 8 * rng.randrange(0x80))
        elif rng.random() < 0.5:
            board.bus.write(port, size, rng.getrandbits(8 * size))
        else:
            board.bus.read(port, size)
        if n % 2000 == 0:
            time.sleep(0.01)                                      # let pieces complete in between
    board.bm.drain()
    assert board.bm.transfers + board.bm.errors > 0 and not board.bm.in_flight
    assert all(board.bus.read(c, 1) & (DRDY | 0x80) for c in (0x3F6, 0x376))


# --- the whole path: raw guests as the driver, the board as install.py wires it -----

def _find_ide_prefix() -> str:
    """Guest code that finds the PIIX IDE function, puts BAR 4 at 0xC000 and
    turns on I/O decode and bus mastering (test_ide_dma.py's guest)."""
    from tests.devices.test_ide_dma import DMA_GUEST
    return DMA_GUEST.split("    movl $0x2000, 0x1000")[0]


def _task(cmd: int, dev: int, lba: int, command: int) -> str:
    return f"""
    mov ${cmd + 6:#x}, %dx
    mov ${dev:#x}, %al
    out %al, %dx
    mov ${cmd + 2:#x}, %dx
    mov $1, %al
    out %al, %dx
    mov ${cmd + 3:#x}, %dx
    mov ${lba}, %al
    out %al, %dx
    xor %al, %al
    inc %dx
    out %al, %dx
    inc %dx
    out %al, %dx
    mov ${cmd + 7:#x}, %dx
    mov ${command:#x}, %al
    out %al, %dx
"""


def _pio(cmd: int, dev: int, lba: int, buffer: int, to_memory: bool) -> str:
    """READ SECTORS (to_memory) or WRITE SECTORS of one sector at `lba`:
    the task, DRQ awaited, 256 words between the data port and `buffer`."""
    index, string_op = ("%di", "insw") if to_memory else ("%si", "outsw")
    return f"""{_task(cmd, dev, lba, 0x20 if to_memory else 0x30)}
1:  in %dx, %al
    test $0x08, %al
    jz 1b
    mov ${cmd:#x}, %dx
    mov ${buffer:#x}, {index}
    mov $256, %cx
    rep {string_op}"""


def _dma(cmd: int, bm: int, dev: int, lba: int, to_memory: bool, prd: int, buffer: int, record: int) -> str:
    """One-sector READ/WRITE DMA through a PRD table at `prd`; the bus-master
    and ATA status at the end stored at `record` and `record + 1`."""
    direction = 0x08 if to_memory else 0
    return f"""
    movl ${buffer:#x}, {prd:#x}
    movl $0x80000200, {prd + 4:#x}
    mov ${bm + 4:#x}, %dx
    mov ${prd:#x}, %eax
    out %eax, %dx
    mov ${bm:#x}, %dx
    mov ${direction:#x}, %al
    out %al, %dx
{_task(cmd, dev, lba, 0xC8 if to_memory else 0xCA)}
    mov ${bm:#x}, %dx
    mov ${direction | 1:#x}, %al
    out %al, %dx
    mov ${bm + 2:#x}, %dx
1:  in %dx, %al
    test $0x04, %al
    jz 1b
    mov %al, {record:#x}
    mov ${bm:#x}, %dx
    xor %al, %al
    out %al, %dx
    mov ${bm + 2:#x}, %dx
    mov $0x06, %al
    out %al, %dx
    mov ${cmd + 7:#x}, %dx
    in %dx, %al
    mov %al, {record + 1:#x}
"""


def four_positions_guest(positions) -> str:
    """For each present position i: PIO READ SECTORS of LBA 0 to 0x3000 +
    0x200*i, PIO WRITE SECTORS of that to LBA 2, READ DMA of LBA 1 to 0x4000
    + 0x200*i, WRITE DMA of that to LBA 3; statuses at 0x600 + 8*i.  For
    every position, its Status once selected at 0x700 + i."""
    code = [_find_ide_prefix(), "    cld"]
    for i in POSITIONS:
        cmd, _, bm, dev = Board.ports(i)
        code.append(f"""
    mov ${cmd + 6:#x}, %dx
    mov ${dev:#x}, %al
    out %al, %dx
    mov ${cmd + 7:#x}, %dx
    in %dx, %al
    mov %al, {0x700 + i:#x}
""")
        if i not in positions:
            continue
        pio, dmabuf, record = 0x3000 + 0x200 * i, 0x4000 + 0x200 * i, 0x600 + 8 * i
        code.append(f"""
{_pio(cmd, dev, 0, pio, True)}
{_pio(cmd, dev, 2, pio, False)}
    mov ${cmd + 7:#x}, %dx
1:  in %dx, %al
    test $0x08, %al
    jnz 1b
    mov %al, {record:#x}
{_dma(cmd, bm, dev, 1, True, 0x1000 + 0x10 * i, dmabuf, record + 1)}
{_dma(cmd, bm, dev, 3, False, 0x1100 + 0x10 * i, dmabuf, record + 3)}
""")
    code.append("""
    xor %al, %al
    out %al, $0xF4
    hlt
""")
    return "".join(code)


@pytest.mark.parametrize("positions", [(0, 1, 2, 3), (1, 2)], ids=["all-four", "slave-and-secondary-master"])
@pytest.mark.parametrize("engine", ["bt", pytest.param("hw", marks=pytest.mark.kvm)])
def test_a_guest_reads_and_writes_every_position_by_pio_and_dma(tmp_path, engine, positions):
    from pyvmm.config import DriveConfig, VmConfig
    from pyvmm.machine import StopReason
    from tests.rawguest import build_guest, raw_boot, run_machine
    paths, data = {}, {}
    for i in positions:
        paths[i] = str(tmp_path / f"disk{i}.raw")
        RawImage.create(paths[i], SECTORS * 512)
        data[i] = os.urandom(1024)
        with open(paths[i], "r+b") as f:
            f.write(data[i])
    drives = [DriveConfig(paths[i], "raw", index=i) for i in reversed(positions)]
    cfg = VmConfig(mem_mib=16, engine=engine, debug_exit=(0xF4, 1), no_reboot=True, ide_drives=drives)
    machine, _ = run_machine(cfg, raw_boot(build_guest(four_positions_guest(positions), "real"), "real"),
                             timeout=60, inspect=lambda m: (m.memory.read(0x600, 0x110), m.memory.read(0x3000, 0x2000)))
    status = machine.stop_status
    assert status.reason is StopReason.DEBUG_EXIT and status.value == 0, status
    records, buffers = machine.inspected
    for i in POSITIONS:
        if i not in positions:
            assert records[0x100 + i] == 0, f"absent position {i} answers {records[0x100 + i]:#x}"
            continue
        assert records[0x100 + i] == DRDY | DSC
        assert records[8 * i:8 * i + 5] == bytes([DRDY | DSC, INTERRUPT, DRDY | DSC, INTERRUPT, DRDY | DSC]), i
        assert buffers[0x200 * i:0x200 * (i + 1)] == data[i][:512]
        assert buffers[0x1000 + 0x200 * i:0x1000 + 0x200 * (i + 1)] == data[i][512:]
        assert get(paths[i], 2, 2) == data[i]


BIG = 65536                                   # sectors: the largest READ DMA EXT, 32 MiB
BIG_BUFFER = 0x1000000

COUNTING_GUEST = """
    mov $0x1000, %di              # 512 PRD entries of 64 KiB from 16 MiB on
    mov $0x1000000, %eax
    mov $512, %cx
1:  mov %eax, (%di)
    movl $0, 4(%di)
    add $0x10000, %eax
    add $8, %di
    loop 1b
    orl $0x80000000, -4(%di)
    mov $0xC00C, %dx              # the secondary channel's bus master
    mov $0x1000, %eax
    out %eax, %dx
    mov $0xC008, %dx
    mov $0x08, %al
    out %al, %dx
    xor %al, %al                  # READ DMA EXT, 65536 sectors from LBA 0, secondary slave
    mov $0x172, %dx
    out %al, %dx
    out %al, %dx
    mov $0x173, %dx
    out %al, %dx
    out %al, %dx
    mov $0x174, %dx
    out %al, %dx
    out %al, %dx
    mov $0x175, %dx
    out %al, %dx
    out %al, %dx
    mov $0x176, %dx
    mov $0x50, %al
    out %al, %dx
    mov $0x177, %dx
    mov $0x25, %al
    out %al, %dx
    mov $0xC008, %dx              # start
    mov $0x09, %al
    out %al, %dx
    mov $0xC00A, %dx
    in %dx, %al                   # the status right after the start
    mov %al, 0x500
    xor %ecx, %ecx
3:  inc %ecx                      # count until the interrupt bit
    in %dx, %al
    test $0x04, %al
    jz 3b
    mov %al, 0x501
    mov %ecx, 0x504
    mov $0x177, %dx
    in %dx, %al
    mov %al, 0x502
    xor %al, %al
    out %al, $0xF4
    hlt
"""


@pytest.mark.parametrize("engine", ["bt", pytest.param("hw", marks=pytest.mark.kvm)])
def test_the_vcpu_runs_on_while_a_32_mib_dma_read_is_in_flight(tmp_path, engine):
    """The start write returns with the engine active and the vCPU counts
    on until the interrupt bit comes; the whole 32 MiB arrives."""
    from pyvmm.config import DriveConfig, VmConfig
    from pyvmm.machine import StopReason
    from tests.rawguest import build_guest, raw_boot, run_machine
    path = str(tmp_path / "big.raw")
    RawImage.create(path, BIG * 512)
    marks = {0: os.urandom(512), 40000: os.urandom(512), BIG - 1: os.urandom(512)}
    with open(path, "r+b") as f:
        for sector, mark in marks.items():
            f.seek(sector * 512)
            f.write(mark)
    cfg = VmConfig(mem_mib=64, engine=engine, debug_exit=(0xF4, 1), no_reboot=True,
                   ide_drives=[DriveConfig(path, "raw", index=3)])
    code = build_guest(_find_ide_prefix() + COUNTING_GUEST, "real")

    def inspect(m):
        return m.memory.read(0x500, 8), {s: m.memory.read(BIG_BUFFER + 512 * s, 512) for s in marks}
    machine, _ = run_machine(cfg, raw_boot(code, "real"), timeout=180, inspect=inspect)
    status = machine.stop_status
    assert status.reason is StopReason.DEBUG_EXIT and status.value == 0, status
    record, got = machine.inspected
    assert record[0] == ACTIVE, f"status right after the start: {record[0]:#x}"
    assert record[1] == INTERRUPT and record[2] == DRDY | DSC
    count = struct.unpack_from("<I", record, 4)[0]
    assert count >= 100, f"the vCPU polled only {count} times while 32 MiB moved"
    assert got == marks


@pytest.mark.parametrize("boot,blank", [(3, ()), (1, (2,))],
                         ids=["secondary-slave-alone", "primary-slave-then-secondary"])
def test_seabios_finds_disks_off_the_primary_master_and_boots_the_first(tmp_path, boot, blank):
    """SeaBIOS's own ATA probe on both channels: the boot disk in a slave
    position (and a blank disk after it) is found, read by PIO and booted
    with DL = 0x80, as on the primary master (test_ide.py)."""
    from pyvmm.boot.firmware import DEFAULT_BIOS
    from pyvmm.config import DriveConfig, VmConfig
    from pyvmm.machine import StopReason
    from tests.firmware.bootdisk import DEBUG_EXIT_PORT, GREETING, write_disk
    from tests.hostfacts import require_from_setup
    from tests.rawguest import run_machine
    require_from_setup(paths=[DEFAULT_BIOS], package="seabios")
    drives = [DriveConfig(str(write_disk(tmp_path / "mbr.img")), "raw", index=boot)]
    for i in blank:
        RawImage.create(str(tmp_path / f"blank{i}.raw"), SECTORS * 512)
        drives.append(DriveConfig(str(tmp_path / f"blank{i}.raw"), "raw", index=i))
    out = bytearray()
    cfg = VmConfig(bios=DEFAULT_BIOS, engine="bt", no_reboot=True, mem_mib=64, ide_drives=drives,
                   debug_exit=(DEBUG_EXIT_PORT, 1))
    machine, _ = run_machine(cfg, None, output=out.extend, timeout=240)
    text = out.decode(errors="replace")
    assert GREETING in text, text
    assert machine.stop_status.reason is StopReason.DEBUG_EXIT and machine.stop_status.value == 0x80, text
    for i in (boot, *blank):
        assert machine.devices[f"ide{i // 2}"].commands.get(0xEC), f"SeaBIOS sent no IDENTIFY to position {i}"


@pytest.mark.parametrize("deterministic", [False, True])
def test_the_board_gives_dma_an_io_thread_and_a_pause_drain_unless_deterministic(tmp_path, deterministic):
    """A pause waits for a transfer in flight (machine.drains); a
    deterministic run (FT record and replay) keeps each transfer inside the
    access that starts it, whose timing does not depend on the host."""
    from pyvmm.builder import build_machine, destroy_machine
    from pyvmm.config import DriveConfig, VmConfig
    from tests.rawguest import build_guest, raw_boot
    path = str(tmp_path / "d.raw")
    RawImage.create(path, SECTORS * 512)
    cfg = VmConfig(mem_mib=16, engine="bt", deterministic=deterministic,
                   ide_drives=[DriveConfig(path, "raw", index=2)])
    machine = build_machine(cfg, lambda data: None, raw_boot(build_guest("hlt", "real"), "real"))
    try:
        bm = machine.devices["ide_bus_master"]
        assert (bm.drain in machine.drains) is not deterministic
        assert (bm._io is None) is deterministic
        assert "ide0" not in machine.devices and machine.devices["ide1"].master is not None
    finally:
        destroy_machine(machine)
