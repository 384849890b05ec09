"""The PIIX IDE bus master (BAR 4, 16 ports): DMA between an IDE channel's
disk and guest RAM, as the Intel PIIX/PIIX3 datasheet and the PCI IDE
bus-master programming interface describe it.

Per channel (primary at offset 0, secondary at 8): a command register
(bit 0 start/stop, bit 3 direction: 1 = the bus master writes memory, i.e.
a disk read), a status register (bit 0 active, bit 1 error and bit 2
interrupt, both write-1-to-clear, bits 5-6 drive-DMA-capable flags that
firmware sets) and the 32-bit address of the Physical Region Descriptor
table.  A PRD entry is 8 bytes: a buffer address, a byte count in the low
16 bits of the second dword (0 means 64 KiB; bit 0 of both is ignored, the
buffers being word aligned) and bit 31 of the second dword marking the
last entry (EOT).

A transfer begins when the second of the two things it needs happens
(the ATA command waiting, the start bit set): the PRD table is checked
there and then.  It touches guest RAM only: a PRD table or buffer outside
RAM, a table that ends before the request does, more entries than a 64
KiB table holds, a direction that contradicts the ATA command: the bus
master sets its error bit, the ATA command fails with ABRT, nothing is
transferred, and the interrupt still comes.  A PRD table longer than the
request leaves the active bit set, as the datasheet says (the driver
clears start).  PCI bus mastering (command bit 2) must be on.

Where the board gives the bus master an I/O thread (use_io_thread(), as
install.py does), the write that starts a transfer returns at once with
the active bit set: the disk work runs on the I/O thread in 64 KiB pieces,
and the machine's event loop, under the machine's lock, moves each piece
between guest RAM and the thread and, after the last, sets the interrupt
bit, clears active and lets the drive interrupt.  Clearing start, a new
ATA command or a reset abandons a transfer (pieces already written stay
written, as on a real disk).  drain() runs one in flight to its end; a
pause waits on it and save() does it, so a snapshot never sees one half
done.  Without an I/O thread (unit tests, deterministic runs) the whole
transfer runs inside the access that begins it.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
import time
from collections.abc import Callable

from ...device import as_hex, restore_state, saved
from ...errors import StateError, VmmError
from .ata import ABRT, SECTOR, UNC

log = logging.getLogger(__name__)

PORTS = 16
# Register offsets inside one channel's 8 ports.
COMMAND, STATUS, PRD_TABLE = 0, 2, 4
# Command bits.
START, TO_MEMORY = 0x01, 0x08
# Status bits.
ACTIVE, ERROR, INTERRUPT, DRIVE_CAPABLE = 0x01, 0x02, 0x04, 0x60
PRD = struct.Struct("<II")
EOT = 1 << 31
MAX_PRD_ENTRIES = 0x10000 // PRD.size     # a table may not cross a 64 KiB boundary
CHUNK_SECTORS = 128                       # disk I/O in 64 KiB pieces, whatever the request size
DRAIN_TIMEOUT_S = 60.0


class _Transfer:
    """One DMA command on its way through the I/O thread."""

    def __init__(self, index: int, channel, disk, lba: int, count: int, writing: bool,
                 segments: list[tuple[int, int]], exact: bool):
        self.index, self.channel, self.disk = index, channel, disk
        self.lba, self.count, self.writing, self.exact = lba, count, writing, exact
        self.cursor = _Cursor(segments)
        self.done = 0                     # sectors moved so far

    def __repr__(self) -> str:
        return (f"_Transfer(channel {self.index}, {'write' if self.writing else 'read'} "
                f"{self.done}/{self.count} sectors from {self.lba})")


class IdeBusMaster:
    """The bus-master block of both channels. `memory` is the GuestMemory
    DMA reaches (None: no transfer ever starts); `mastering()` says whether
    the PCI function may master the bus."""

    STATE_VERSION = 1
    # Transfers complete on the event loop: the bus holds the machine's
    # lock around these registers even with one vCPU (bus.py).
    INPUT_FROM_LOOP = True

    def __init__(self, memory=None, mastering: Callable[[], bool] = lambda: True) -> None:
        self.regs = bytearray(PORTS)
        self.memory = memory
        self.mastering = mastering
        self.channels: list = [None, None]
        self.transfers = 0                # completed DMA commands (diagnostics)
        self.errors = 0                   # transfers refused for a bad PRD table or direction
        # Set by use_io_thread(); None: a transfer runs inside the access that starts it.
        self._io = None
        self._post: Callable[[Callable[[], None]], None] | None = None
        self._lock: threading.RLock | None = None
        self._flight: list[_Transfer | None] = [None, None]     # per channel
        # Pieces the I/O thread finished: (transfer, sectors, RAM pieces, data, error).
        self._pieces: collections.deque = collections.deque()

    def __repr__(self) -> str:
        return f"IdeBusMaster(regs={self.regs.hex()}, transfers={self.transfers}, errors={self.errors})"

    def attach(self, index: int, channel) -> None:
        """Makes this block carry `channel`'s DMA commands (index 0: primary)."""
        self.channels[index] = channel
        channel.dma_engine = self

    def use_io_thread(self, io, post: Callable[[Callable[[], None]], None], lock: threading.RLock) -> None:
        """Does the disk work on IoThread `io` from now on; `post(callback)`
        runs callback on the machine's event loop under `lock`."""
        self._io, self._post, self._lock = io, post, lock

    @property
    def in_flight(self) -> bool:
        return any(self._flight)

    # --- registers --------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.regs[offset:offset + size].ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        started = []
        for i, byte in enumerate(value.to_bytes(size, "little")):
            reg = offset + i
            if reg >= PORTS:
                break
            base, kind = reg & ~7, reg % 8
            if kind == COMMAND:
                was = self.regs[reg]
                self.regs[reg] = byte & (START | TO_MEMORY)
                if byte & START and not was & START:
                    self.regs[base + STATUS] |= ACTIVE
                    started.append(base // 8)
                elif was & START and not byte & START:
                    self.regs[base + STATUS] &= ~ACTIVE    # stopped: the engine lets go
                    self._flight[base // 8] = None
            elif kind == STATUS:         # error and interrupt: write 1 to clear
                keep = self.regs[reg] & (ACTIVE | ERROR | INTERRUPT) & ~(byte & (ERROR | INTERRUPT))
                self.regs[reg] = keep | (byte & DRIVE_CAPABLE)
            elif kind >= PRD_TABLE:      # dword aligned
                self.regs[reg] = byte & 0xFC if kind == PRD_TABLE else byte
        for index in started:            # after the whole access: a dword write sets the table too
            self._run(index)

    def reset(self) -> None:
        self._flight = [None, None]
        self.regs[:] = bytes(PORTS)

    def save(self) -> dict:
        self.drain()
        return saved(self, {"regs": self.regs.hex()})

    def restore(self, state: dict) -> None:
        self._flight = [None, None]      # the restored state has none in flight (save() drains)
        def load(s: dict) -> None:
            regs = as_hex(s["regs"])
            if len(regs) != PORTS:
                raise ValueError(f"{len(regs)} bus-master registers")
            self.regs[:] = regs
        restore_state(self, state, load)

    # --- transfers --------------------------------------------------------------------

    def abandon(self, channel) -> None:
        """Drops `channel`'s transfer in flight, if any: its command is over."""
        if channel in self.channels:
            self._flight[self.channels.index(channel)] = None

    def stop_io(self) -> None:
        """Runs the disk work submitted and ends the I/O thread (before the
        images close)."""
        if self._io is not None:
            self._io.stop()

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Runs the transfers in flight to their end, interrupt included.
        Any thread but the I/O thread. Raises StateError when the disk work
        does not finish within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self._io is not None:
            with self._lock:
                self._advance()
                if not self.in_flight:
                    return
            left = deadline - time.monotonic()
            if left <= 0 or not self._io.wait_idle(left):
                raise StateError(f"IDE DMA: a transfer did not finish in {timeout:.0f} s")

    def device_ready(self, channel) -> None:
        """`channel` has a DMA command waiting: run it if the driver has
        started this engine already."""
        if channel in self.channels:
            self._run(self.channels.index(channel))

    def _run(self, index: int) -> None:
        channel, base = self.channels[index], 8 * index
        if channel is None or self.memory is None or not self.mastering():
            return
        if not self.regs[base] & START or not self.regs[base + STATUS] & ACTIVE or self._flight[index]:
            return
        request = channel.dma_request()
        if request is None:
            return                       # started before the command: the command will call back
        disk, lba, count, writing = request
        table = int.from_bytes(self.regs[base + PRD_TABLE:base + PRD_TABLE + 4], "little")
        plan = None if bool(self.regs[base] & TO_MEMORY) == writing else self._segments(table, count * SECTOR)
        if plan is None:
            self.errors += 1
            log.debug("IDE DMA refused: PRD table at %#x, %d sectors, %s", table, count,
                      "write" if writing else "read")
            self.regs[base + STATUS] = (self.regs[base + STATUS] & ~ACTIVE) | ERROR | INTERRUPT
            channel.dma_done(ABRT)
            return
        segments, exact = plan
        if self._io is not None:
            transfer = self._flight[index] = _Transfer(index, channel, disk, lba, count, writing, segments, exact)
            self._next_piece(transfer)
            return
        error = self._move(disk, lba, count, segments, writing)
        self._complete(index, channel, exact, error)

    def _complete(self, index: int, channel, exact: bool, error: int) -> None:
        base = 8 * index
        self.transfers += 1
        status = self.regs[base + STATUS] | INTERRUPT
        if exact or error:
            status &= ~ACTIVE
        self.regs[base + STATUS] = status
        channel.dma_done(error)

    def _segments(self, table: int, total: int) -> tuple[list[tuple[int, int]], bool] | None:
        """The guest-RAM buffers, (address, length), that carry `total`
        bytes under the PRD table at `table`, and whether the table ends
        exactly there; None when the table or a buffer is not RAM, or the
        table ends too soon."""
        memory, segments, need = self.memory, [], total
        for i in range(MAX_PRD_ENTRIES):
            entry = table + i * PRD.size
            if not memory.is_ram(entry, PRD.size):
                return None
            address, control = PRD.unpack(memory.read(entry, PRD.size))
            address &= ~1
            length = (control & 0xFFFE) or 0x10000
            take = min(length, need)
            if not memory.is_ram(address, take):
                return None
            segments.append((address, take))
            need -= take
            if need == 0:
                return segments, bool(control & EOT) and take == length
            if control & EOT:
                return None
        return None

    # --- a transfer on the I/O thread ----------------------------------------------------

    def _next_piece(self, t: _Transfer) -> None:
        """Under the machine's lock: hands the next piece's disk work to the
        I/O thread, a write's data gathered from guest RAM first."""
        n = min(CHUNK_SECTORS, t.count - t.done)
        offset = (t.lba + t.done) * SECTOR
        pieces = t.cursor.take(n * SECTOR)
        try:                              # checked as RAM when the transfer began; RAM does not shrink
            data = b"".join(self.memory.read(a, k) for a, k in pieces) if t.writing else None
        except VmmError as e:
            log.warning("IDE DMA from guest RAM failed: %s", e)
            self._flight[t.index] = None
            self._complete(t.index, t.channel, t.exact, UNC)
            return
        self._io.submit(lambda: self._disk_work(t, offset, n, pieces, data))

    def _disk_work(self, t: _Transfer, offset: int, n: int, pieces, data: bytes | None) -> None:
        """On the I/O thread: one piece's disk read or write, its result
        handed to the event loop.  Touches the image only."""
        error = 0
        try:
            if t.writing:
                t.disk.image.write(offset, data)
            else:
                data = t.disk.image.read(offset, n * SECTOR)
        except Exception as e:       # a host error the image did not wrap, too: the guest sees UNC
            log.warning("IDE DMA %s of %r at sector %d failed: %s", "write" if t.writing else "read",
                        t.disk, offset // SECTOR, e)
            error = UNC
        self._pieces.append((t, n, pieces, data, error))
        self._post(self._advance)

    def _advance(self) -> None:
        """On the event loop (or a drain), under the machine's lock: puts
        the pieces read into guest RAM, then starts the next piece or
        completes the transfer.  Pieces of an abandoned transfer are dropped."""
        while self._pieces:
            t, n, pieces, data, error = self._pieces.popleft()
            if self._flight[t.index] is not t:
                continue
            if not t.writing and not error:
                at = 0
                try:                      # checked as RAM when the transfer began; RAM does not shrink
                    for a, k in pieces:
                        self.memory.write(a, data[at:at + k])
                        at += k
                except VmmError as e:
                    log.warning("IDE DMA into guest RAM failed: %s", e)
                    error = UNC
            t.done += n
            if error or t.done == t.count:
                self._flight[t.index] = None
                self._complete(t.index, t.channel, t.exact, error)
            else:
                self._next_piece(t)

    def _move(self, disk, lba: int, count: int, segments: list[tuple[int, int]], writing: bool) -> int:
        """Moves `count` sectors from `lba` between the disk and
        `segments`; returns 0, or UNC when the image failed."""
        memory, cursor = self.memory, _Cursor(segments)
        for first in range(0, count, CHUNK_SECTORS):
            n = min(CHUNK_SECTORS, count - first)
            offset = (lba + first) * SECTOR
            try:
                if writing:
                    disk.image.write(offset, b"".join(memory.read(a, k) for a, k in cursor.take(n * SECTOR)))
                else:
                    data, at = disk.image.read(offset, n * SECTOR), 0
                    for a, k in cursor.take(n * SECTOR):
                        memory.write(a, data[at:at + k])
                        at += k
            except (OSError, VmmError) as e:
                log.warning("IDE DMA %s of %r at sector %d failed: %s", "write" if writing else "read",
                            disk, lba + first, e)
                return UNC
        return 0


class _Cursor:
    """Walks a scatter list in pieces of any byte size."""

    def __init__(self, segments: list[tuple[int, int]]):
        self.segments, self.index, self.offset = segments, 0, 0

    def take(self, size: int) -> list[tuple[int, int]]:
        """The next `size` bytes as (address, length) pieces."""
        out = []
        while size:
            address, length = self.segments[self.index]
            k = min(size, length - self.offset)
            out.append((address + self.offset, k))
            self.offset += k
            size -= k
            if self.offset == length:
                self.index, self.offset = self.index + 1, 0
        return out


__all__ = ["IdeBusMaster"]
