"""One IDE channel: the ATA task file shared by its two device positions,
and an ATA disk (a DiskImage) in either or both of them (master: device 0,
slave: device 1, chosen by bit 4 of the device register).

Two register windows, each a Registers device that knows only its offsets:
`channel.command` (8 ports: data, error/features, sector count, LBA
low/mid/high, device, status/command) and `channel.control` (1 port:
alternate status / device control). The board puts them at 0x1F0 and 0x3F6
for the primary channel (INTRQ on IRQ 14), 0x170 and 0x376 for the
secondary (IRQ 15).

Writes to the task file reach both positions, as on the cable.  With the
selected position empty and the other one there, the present device
answers for it as ATA has device 0 do for a missing device 1: Status,
Alternate Status and Error read 00h, the other registers their shared
contents, and commands go nowhere, so Linux (status 00h: no device) and
SeaBIOS see exactly the disks that are there.  Status, error, INTRQ and
the transfer in progress belong to the device that took the last command;
the transfer mode SET FEATURES picks is kept per channel.

Commands (ATA/ATAPI-8 ACS): IDENTIFY DEVICE, READ/WRITE SECTORS (LBA28
and CHS) and their EXT forms (LBA48), READ VERIFY, FLUSH CACHE (EXT), SET
FEATURES (with SET TRANSFER MODE), and the no-data housekeeping that
drivers send (INITIALIZE DEVICE PARAMETERS, RECALIBRATE, IDLE/STANDBY,
CHECK POWER MODE, EXECUTE DEVICE DIAGNOSTIC).  READ/WRITE DMA (and EXT)
when a bus master is attached (busmaster.py, `dma_engine`): the command
leaves the device waiting with DRQ set and the bus master moves the data
once the driver starts it.  Anything else ends in ABRT, as do DMA
commands without a bus master (IDENTIFY then offers no DMA mode).  A
request past the end of the disk ends in IDNF, a failing host read or
write in UNC: the guest sees an ATA error, pyvmm never an exception. PIO
data moves one 512-byte sector at a time (DMA in 64 KiB pieces), so a
65536-sector request costs no more memory than a one-sector one.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from ...device import as_hex, restore_state, saved
from ...errors import VmmError
from ...irq import IrqLine

log = logging.getLogger(__name__)

SECTOR = 512
# Command block offsets.
DATA, ERROR, COUNT, LBA_LOW, LBA_MID, LBA_HIGH, DEVICE, STATUS = range(8)
FEATURES, COMMAND = ERROR, STATUS
# Status bits.
BSY, DRDY, DF, DSC, DRQ, ERR = 0x80, 0x40, 0x20, 0x10, 0x08, 0x01
# Error bits.
UNC, IDNF, ABRT = 0x40, 0x10, 0x04
# Device register: LBA addressing, device 1 selected.
DEV_LBA, DEV_SLAVE = 0x40, 0x10
# Device control register.
CTL_HOB, CTL_SRST, CTL_NIEN = 0x80, 0x04, 0x02

READ_SECTORS = (0x20, 0x21)
READ_SECTORS_EXT = 0x24
WRITE_SECTORS = (0x30, 0x31)
WRITE_SECTORS_EXT = 0x34
READ_VERIFY = (0x40, 0x41)
READ_VERIFY_EXT = 0x42
FLUSH_CACHE, FLUSH_CACHE_EXT = 0xE7, 0xEA
READ_DMA, WRITE_DMA = (0xC8, 0xC9), (0xCA, 0xCB)   # with and without retries
READ_DMA_EXT, WRITE_DMA_EXT = 0x25, 0x35
SET_FEATURES, SET_TRANSFER_MODE = 0xEF, 0x03
IDENTIFY_DEVICE = 0xEC
EXECUTE_DIAGNOSTIC = 0x90
CHECK_POWER_MODE = 0xE5
# No-data commands that succeed with nothing to do on a virtual disk.
NO_OP = {0x10, 0x91, 0xE0, 0xE1, 0xE2, 0xE3, 0x94, 0x95, 0x96, 0x97}
# Legacy CHS geometry reported in IDENTIFY words 1, 3, 6.
HEADS, SECTORS_PER_TRACK = 16, 63
LBA28_LIMIT = 1 << 28
# Transfer modes, as SET TRANSFER MODE's count register names them: the
# mode type in bits 7:3, the mode number in 2:0.  Offered: PIO 0-4,
# multiword DMA 0-2, Ultra DMA 0-5 (the 80-conductor cable reported in
# word 93 allows modes above 2).
PIO_DEFAULT, PIO_FLOW, MWDMA, UDMA = 0x00, 0x08, 0x20, 0x40
MAX_MODE = {PIO_DEFAULT: 0, PIO_FLOW: 4, MWDMA: 2, UDMA: 5}
DEFAULT_MODE = MWDMA | 2


def _ata_string(text: str, length: int) -> bytes:
    """An IDENTIFY string: space-padded, each byte pair swapped."""
    raw = text.encode("ascii")[:length].ljust(length, b" ")
    return bytes(raw[i ^ 1] for i in range(length))


class AtaDisk:
    """A disk in one position of a channel: its image and IDENTIFY data."""

    def __init__(self, image, serial: str = "PYVMM-ATA-0", model: str = "pyvmm ATA disk"):
        self.image = image
        self.sectors = image.size // SECTOR
        self.readonly = bool(getattr(image, "readonly", False))
        self.serial = serial
        self.model = model

    def __repr__(self) -> str:
        return f"AtaDisk({getattr(self.image, 'path', '?')!r}, {self.sectors} sectors)"

    def identify(self, dma: bool = False, mode: int = DEFAULT_MODE, device: int = 0) -> bytes:
        """The 256 IDENTIFY DEVICE words (ACS: words 0-106 used here).
        With `dma`, the DMA modes offered and the one `mode` (a SET
        TRANSFER MODE value) selects; `device` (0 or 1) fills the
        hardware-reset half of word 93 that belongs to it."""
        w = [0] * 256
        lba28 = min(self.sectors, LBA28_LIMIT - 1)
        cylinders = max(1, min(16383, self.sectors // (HEADS * SECTORS_PER_TRACK)))
        w[0] = 0x0040                                  # fixed, non-removable ATA device
        w[1], w[3], w[6] = cylinders, HEADS, SECTORS_PER_TRACK
        w[47] = 0x8000                                 # READ/WRITE MULTIPLE: not supported (0 sectors)
        w[49] = 1 << 9 | (1 << 8 if dma else 0)        # LBA; DMA
        w[53] = 0x0006                                 # words 64-70 and 88 are valid
        w[54], w[55], w[56] = cylinders, HEADS, SECTORS_PER_TRACK
        chs = cylinders * HEADS * SECTORS_PER_TRACK
        w[57], w[58] = chs & 0xFFFF, chs >> 16
        w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
        w[64] = 0x0003                                 # PIO modes 3 and 4
        w[65] = w[66] = w[67] = w[68] = 120            # cycle times (ns) for PIO 4
        if dma:
            kind, number = mode & 0xF8, mode & 0x07
            w[63] = 0x0007 | (1 << (8 + number) if kind == MWDMA else 0)    # MWDMA 0-2 offered
            w[88] = 0x003F | (1 << (8 + number) if kind == UDMA else 0)     # UDMA 0-5 offered
            w[93] = 0x6001 if device == 0 else 0x6100  # device 0 / 1 reset result; 80-conductor cable
        w[80] = 0x00F0                                 # ATA/ATAPI-4 to -7
        w[82] = 1 << 14                                # NOP (which always aborts, as here)
        w[83] = (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10)   # FLUSH CACHE EXT, FLUSH CACHE, 48-bit
        w[84] = 1 << 14
        w[86] = (1 << 13) | (1 << 12) | (1 << 10)      # the same, enabled
        w[87] = 1 << 14
        w[100:104] = [(self.sectors >> s) & 0xFFFF for s in (0, 16, 32, 48)]
        data = bytearray(struct.pack("<256H", *w))
        data[20:40] = _ata_string(self.serial, 20)     # words 10-19
        data[46:54] = _ata_string("1.0", 8)            # words 23-26: firmware revision
        data[54:94] = _ata_string(self.model, 40)      # words 27-46
        return bytes(data)


class _Window:
    """A register window onto the channel (command block or control block)."""

    # DMA transfers complete on the event loop (busmaster.py): the bus holds
    # the machine's lock around these registers even with one vCPU.
    INPUT_FROM_LOOP = True

    def __init__(self, read: Callable[[int, int], int], write: Callable[[int, int, int], None]):
        self.read, self.write = read, write


class IdeChannel:
    """Task file, PIO data transfer and INTRQ of one channel."""

    STATE_VERSION = 3
    # Version 1 had no DMA: nothing pending, the default mode selected;
    # versions 1 and 2 had only a master, which took every command.
    STATE_UPGRADES = {1: lambda fields: {**fields, "dma_pending": False, "mode": DEFAULT_MODE},
                      2: lambda fields: {**fields, "active": 0}}

    def __init__(self, irq: IrqLine, master: AtaDisk | None = None, slave: AtaDisk | None = None):
        self.irq = irq
        self.disks: list[AtaDisk | None] = [master, slave]
        self.active = 0                      # the position that took the last command
        self.command = _Window(self._command_read, self._command_write)
        self.commands: dict[int, int] = {}   # command code -> times executed (diagnostics, --stats)
        # The bus master that carries DMA commands' data (busmaster.py
        # attaches itself); None: DMA commands abort.
        self.dma_engine = None
        self.dma_pending = False
        self.mode = DEFAULT_MODE             # the transfer mode SET FEATURES selected
        self.control = _Window(self._control_read, self._control_write)
        self.reset()

    def __repr__(self) -> str:
        return (f"IdeChannel(status={self.status:#x}, error={self.error:#x}, master={self.master!r}, "
                f"slave={self.slave!r}, commands={sum(self.commands.values())})")

    @property
    def master(self) -> AtaDisk | None:
        return self.disks[0]

    @property
    def slave(self) -> AtaDisk | None:
        return self.disks[1]

    # --- state ---------------------------------------------------------------------

    def reset(self) -> None:
        # LBA48 registers are two deep: [current, previous] (the HOB byte).
        self.regs = {r: [0, 0] for r in (FEATURES, COUNT, LBA_LOW, LBA_MID, LBA_HIGH)}
        self.device = 0
        self.devctl = 0
        self.mode = DEFAULT_MODE
        self.pending = False            # INTRQ wanted (before nIEN)
        self._signature()
        self._idle()
        self._update_irq()

    def _idle(self) -> None:
        if self.dma_pending and self.dma_engine is not None:
            self.dma_engine.abandon(self)   # a new command or a reset ends the one the bus master carries
        self.buffer = b""               # the DRQ block being transferred
        self.pos = 0
        self.writing = False
        self.lba = 0
        self.left = 0                   # sectors still to transfer after this block
        self.dma_pending = False        # a DMA command waits for the bus master (lba, left, writing)

    def _signature(self) -> None:
        """What a device shows after reset or diagnostics: an ATA device,
        diagnostic code 1 (no error)."""
        for r, v in ((COUNT, 1), (LBA_LOW, 1), (LBA_MID, 0), (LBA_HIGH, 0)):
            self.regs[r] = [v, 0]
        self.device &= DEV_SLAVE
        self.error = 0x01
        self.status = DRDY | DSC if any(self.disks) else 0

    def save(self) -> dict:
        if self.dma_engine is not None:
            self.dma_engine.drain()     # a DMA transfer in flight ends before its state is taken
        return saved(self, {"regs": {str(k): v for k, v in self.regs.items()}, "device": self.device,
                            "devctl": self.devctl, "status": self.status, "error": self.error,
                            "pending": self.pending, "buffer": bytes(self.buffer).hex(), "pos": self.pos,
                            "writing": self.writing, "lba": self.lba, "left": self.left,
                            "dma_pending": self.dma_pending, "mode": self.mode, "active": self.active})

    def restore(self, state: dict) -> None:
        def load(s: dict) -> None:
            regs = {int(k): [int(v[0]) & 0xFF, int(v[1]) & 0xFF] for k, v in s["regs"].items()}
            if set(regs) != set(self.regs):
                raise ValueError("task file registers")
            self.regs = regs
            self.device, self.devctl = int(s["device"]) & 0xFF, int(s["devctl"]) & 0xFF
            self.status, self.error = int(s["status"]) & 0xFF, int(s["error"]) & 0xFF
            if not all(isinstance(s[k], bool) for k in ("pending", "writing", "dma_pending")):
                raise TypeError("pending, writing and dma_pending are true or false")
            self.pending, self.writing, self.dma_pending = s["pending"], s["writing"], s["dma_pending"]
            self.mode = int(s["mode"]) & 0xFF
            self.buffer, self.pos = bytearray(as_hex(s["buffer"])), int(s["pos"])
            self.lba, self.left = int(s["lba"]), int(s["left"])
            active = int(s["active"])
            if active not in (0, 1):
                raise ValueError(f"active position {active}")
            self.active = active
            self._update_irq()
        if self.dma_engine is not None:
            self.dma_engine.abandon(self)   # the transfer of the state being replaced
        restore_state(self, state, load)

    # --- INTRQ ------------------------------------------------------------------------

    def _interrupt(self) -> None:
        self.pending = True
        self._update_irq()

    def _update_irq(self) -> None:
        self.irq.set_level(1 if self.pending and not self.devctl & CTL_NIEN and self._selected_active() else 0)

    def _selected_active(self) -> bool:
        """Whether the selected position holds the device of the last
        command, the one INTRQ and the Status read's acknowledgement belong to."""
        return self._selected() is not None and (1 if self.device & DEV_SLAVE else 0) == self.active

    def _selected(self) -> AtaDisk | None:
        return self.disks[1 if self.device & DEV_SLAVE else 0]

    def _current(self) -> AtaDisk | None:
        """The disk of the command in progress (the driver may select the
        other position meanwhile)."""
        return self.disks[self.active]

    # --- register windows -------------------------------------------------------------

    def _command_read(self, offset: int, size: int) -> int:
        if offset == DATA:
            return self._data_read(size)
        if not any(self.disks):
            return 0                    # no device on the channel: nothing drives the bus
        if self._selected() is None and offset in (STATUS, ERROR):
            return 0                    # the present device answers 00h for the missing one
        hob = 1 if self.devctl & CTL_HOB else 0
        if offset == STATUS and self._selected_active():
            self.pending = False        # reading Status (not Alternate Status) acknowledges INTRQ
            self._update_irq()
        if offset == STATUS:
            return self.status
        if offset == ERROR:
            return self.error
        if offset == DEVICE:
            return self.device | 0xA0
        return self.regs[offset][hob]

    def _command_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF if offset != DATA else (1 << (8 * size)) - 1
        if offset == DATA:
            self._data_write(size, value)
        elif offset == COMMAND:
            self._execute(value)
        elif offset == DEVICE:
            self.device = value & 0x5F
            self._update_irq()
        else:
            reg = self.regs[offset]
            reg[1], reg[0] = reg[0], value
            self.devctl &= ~CTL_HOB     # a task-file write clears HOB (ATA-6)

    def _control_read(self, offset: int, size: int) -> int:
        return self.status if self._selected() is not None else 0

    def _control_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if value & CTL_SRST and not self.devctl & CTL_SRST:
            self.status = BSY           # reset in progress until SRST drops
            self._idle()
        elif self.devctl & CTL_SRST and not value & CTL_SRST:
            self.pending = False
            self._signature()
        self.devctl = value
        self._update_irq()

    # --- commands --------------------------------------------------------------------

    def _execute(self, cmd: int) -> None:
        disk = self._selected()
        if disk is None or self.status & BSY:
            return                      # no device here, or it is resetting: the command goes nowhere
        self.commands[cmd] = self.commands.get(cmd, 0) + 1
        self.pending = False
        self._idle()
        self.active = 1 if self.device & DEV_SLAVE else 0
        self.error = 0
        self.status = DRDY | DSC
        ext = cmd in (READ_SECTORS_EXT, WRITE_SECTORS_EXT, READ_VERIFY_EXT, READ_DMA_EXT, WRITE_DMA_EXT)
        if cmd == IDENTIFY_DEVICE:
            self._start_data_in(disk.identify(self.dma_engine is not None, self.mode, self.active), 0)
        elif cmd in READ_SECTORS or cmd == READ_SECTORS_EXT:
            self._start_transfer(disk, ext, writing=False)
        elif cmd in WRITE_SECTORS or cmd == WRITE_SECTORS_EXT:
            if disk.readonly:
                self._fail(ABRT)
            else:
                self._start_transfer(disk, ext, writing=True)
        elif cmd in READ_DMA or cmd == READ_DMA_EXT:
            self._start_dma(disk, ext, writing=False)
        elif cmd in WRITE_DMA or cmd == WRITE_DMA_EXT:
            self._start_dma(disk, ext, writing=True)
        elif cmd == SET_FEATURES:
            self._set_features()
        elif cmd in READ_VERIFY or cmd == READ_VERIFY_EXT:
            lba, count = self._address(ext)
            self._fail(IDNF) if lba + count > disk.sectors else self._interrupt()
        elif cmd in (FLUSH_CACHE, FLUSH_CACHE_EXT):
            try:
                disk.image.flush()
            except (OSError, VmmError) as e:
                log.warning("ATA flush of %r failed: %s", disk, e)
                self._fail(ABRT)
                return
            self._interrupt()
        elif cmd == EXECUTE_DIAGNOSTIC:
            self._signature()
            self._interrupt()
        elif cmd == CHECK_POWER_MODE:
            self.regs[COUNT][0] = 0xFF  # active or idle
            self._interrupt()
        elif cmd in NO_OP:
            self._interrupt()
        else:                           # READ/WRITE MULTIPLE, packet commands, the rest
            self._fail(ABRT)

    def _set_features(self) -> None:
        """SET FEATURES: SET TRANSFER MODE checks and keeps the mode (IDENTIFY
        words 63 and 88 then show it); the other subcommands change nothing
        on a virtual disk and succeed."""
        if self.regs[FEATURES][0] != SET_TRANSFER_MODE:
            self._interrupt()
            return
        mode = self.regs[COUNT][0]
        kind, number = mode & 0xF8, mode & 0x07
        if kind not in MAX_MODE or number > MAX_MODE[kind] or (kind in (MWDMA, UDMA) and self.dma_engine is None):
            self._fail(ABRT)
            return
        self.mode = mode
        self._interrupt()

    # --- DMA: the bus master's side --------------------------------------------------

    def _start_dma(self, disk: AtaDisk, ext: bool, writing: bool) -> None:
        """READ/WRITE DMA: checks the request, then waits (DRQ) for the bus
        master, which may already be running."""
        lba, count = self._address(ext)
        if self.dma_engine is None or (writing and disk.readonly):
            self._fail(ABRT)
            return
        if lba + count > disk.sectors:
            self._fail(IDNF)
            return
        self.lba, self.left, self.writing, self.dma_pending = lba, count, writing, True
        self.status = DRDY | DSC | DRQ
        self.dma_engine.device_ready(self)

    def dma_request(self) -> tuple[AtaDisk, int, int, bool] | None:
        """(disk, first LBA, sector count, writing to disk) of the DMA
        command waiting for the bus master, or None."""
        disk = self._current()
        if not self.dma_pending or disk is None:
            return None
        return disk, self.lba, self.left, self.writing

    def dma_done(self, error: int = 0) -> None:
        """The bus master finished the waiting DMA command: with `error` (ATA
        error bits) it failed.  Either way the device interrupts."""
        if error:
            self._fail(error)
            return
        self._idle()
        self.status = DRDY | DSC
        self._interrupt()

    def _address(self, ext: bool) -> tuple[int, int]:
        """(first LBA, sector count) of the task file."""
        r = self.regs
        if ext:
            lba = (r[LBA_LOW][0] | r[LBA_MID][0] << 8 | r[LBA_HIGH][0] << 16
                   | r[LBA_LOW][1] << 24 | r[LBA_MID][1] << 32 | r[LBA_HIGH][1] << 40)
            count = (r[COUNT][0] | r[COUNT][1] << 8) or 65536
        else:
            if self.device & DEV_LBA:
                lba = r[LBA_LOW][0] | r[LBA_MID][0] << 8 | r[LBA_HIGH][0] << 16 | (self.device & 0xF) << 24
            else:   # CHS: sector numbers start at 1
                cylinder = r[LBA_MID][0] | r[LBA_HIGH][0] << 8
                sector = r[LBA_LOW][0]
                lba = (cylinder * HEADS + (self.device & 0xF)) * SECTORS_PER_TRACK + sector - 1
                if sector == 0:
                    lba = 1 << 48       # no such sector: fails the bounds check
            count = r[COUNT][0] or 256
        return lba, count

    def _start_transfer(self, disk: AtaDisk, ext: bool, writing: bool) -> None:
        lba, count = self._address(ext)
        if lba + count > disk.sectors:
            self._fail(IDNF)
            return
        self.lba, self.left, self.writing = lba, count, writing
        if writing:
            self.buffer, self.pos = bytearray(SECTOR), 0
            self.left -= 1
            self.status = DRDY | DSC | DRQ     # PIO data-out: the first block needs no interrupt
        else:
            self._next_read_block(disk)

    def _next_read_block(self, disk: AtaDisk) -> None:
        try:
            data = disk.image.read(self.lba * SECTOR, SECTOR)
        except (OSError, VmmError) as e:
            log.warning("ATA read of %r at sector %d failed: %s", disk, self.lba, e)
            self._fail(UNC)
            return
        self.lba += 1
        self.left -= 1
        self._start_data_in(data, self.left)

    def _start_data_in(self, block: bytes, left: int) -> None:
        self.buffer, self.pos, self.left = block, 0, left
        self.status = DRDY | DSC | DRQ
        self._interrupt()

    def _fail(self, error: int) -> None:
        self._idle()
        self.error = error
        self.status = DRDY | DSC | ERR
        self._interrupt()

    # --- the data port --------------------------------------------------------------

    def _data_read(self, size: int) -> int:
        if self.writing or self.dma_pending or not self.status & DRQ:
            return 0
        chunk = self.buffer[self.pos:self.pos + size]
        self.pos += size
        if self.pos >= len(self.buffer):
            disk = self._current()
            self._idle_keep_status()
            if self.left and disk is not None:
                self._next_read_block(disk)
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def _idle_keep_status(self) -> None:
        left, lba = self.left, self.lba
        self._idle()
        self.left, self.lba = left, lba
        self.status = DRDY | DSC

    def _data_write(self, size: int, value: int) -> None:
        if not self.writing or self.dma_pending or not self.status & DRQ:
            return
        chunk = value.to_bytes(size, "little")[:SECTOR - self.pos]
        self.buffer[self.pos:self.pos + len(chunk)] = chunk
        self.pos += len(chunk)
        if self.pos < SECTOR:
            return
        disk = self._current()
        try:
            disk.image.write(self.lba * SECTOR, bytes(self.buffer))
        except (OSError, VmmError) as e:
            log.warning("ATA write of %r at sector %d failed: %s", disk, self.lba, e)
            self._fail(UNC)
            return
        self.lba += 1
        if self.left:
            self.left -= 1
            self.buffer, self.pos = bytearray(SECTOR), 0
            self.status = DRDY | DSC | DRQ
        else:
            self._idle()
            self.status = DRDY | DSC
        self._interrupt()
