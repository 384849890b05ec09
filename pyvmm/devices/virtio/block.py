"""virtio-blk (virtio 1.2, section 5.2) over a storage.DiskImage.

A request is a chain of: a 16-byte header (type, reserved, sector) in
device-readable buffers, data (readable for OUT, writable for IN), and one
writable status byte at the very end.  Requests answered: IN, OUT, FLUSH,
GET_ID, DISCARD and WRITE_ZEROES (segments of sector, count, flags).

Every request gets a status: a malformed one (too short, data not a whole
number of sectors, past the end of the disk, a write to a read-only disk)
gets IOERR, an unknown type UNSUPP; only a chain without room for the
status byte is a protocol error (QueueError: the transport marks the
device NEEDS_RESET).  Disk I/O runs in the notifying vCPU's thread for
now (issue 16 part 4 moves it to a worker).
"""

from __future__ import annotations

import logging
import struct

from ...errors import ImageError
from ...storage.image import DiskImage
from ...memory import GuestMemory
from .device import DEVICE_ID_BLOCK, VirtioDevice
from .queue import Chain, QueueError, VirtQueue

log = logging.getLogger(__name__)

SECTOR = 512
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2           # header and status take two descriptors
ID_BYTES = 20
MAX_DISCARD_SECTORS = 1 << 22      # 2 GiB per segment
MAX_SEGMENTS = 1

F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH = 1 << 2, 1 << 5, 1 << 6, 1 << 9
F_DISCARD, F_WRITE_ZEROES = 1 << 13, 1 << 14

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
WRITE_ZEROES_UNMAP = 1

HEADER = struct.Struct("<IIQ")     # type, reserved, sector
SEGMENT = struct.Struct("<QII")    # sector, num_sectors, flags
# struct virtio_blk_config up to write_zeroes_may_unmap (offsets 0..56), padded.
CONFIG = struct.Struct("<QII4xI BBHI BxH IIIIIB3x")


class BadRequest(Exception):
    """A request this device answers with IOERR (never leaves the device)."""


class VirtioBlock(VirtioDevice):
    """A disk: `image` read-only when `readonly` or when the image is."""

    DEVICE_ID = DEVICE_ID_BLOCK
    QUEUE_SIZES = (QUEUE_SIZE,)

    def __init__(self, memory: GuestMemory, image: DiskImage, serial: str = "", readonly: bool = False):
        super().__init__(memory)
        self.image = image
        self.readonly = readonly or image.readonly
        self.serial = serial.encode()[:ID_BYTES]
        self.features = F_SEG_MAX | F_BLK_SIZE | F_FLUSH | (F_RO if self.readonly else 0)
        if not self.readonly:
            self.features |= F_DISCARD | F_WRITE_ZEROES
        self.requests = 0
        self.errors = 0

    def __repr__(self) -> str:
        return f"VirtioBlock({self.image.path!r}, {self.image.size} bytes, requests={self.requests})"

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.image.size // SECTOR, 0, SEG_MAX, SECTOR,
                           0, 0, 0, 0,                      # topology: 512-byte physical blocks
                           0, 1,                            # writeback (unused), num_queues
                           MAX_DISCARD_SECTORS, MAX_SEGMENTS, 1,
                           MAX_DISCARD_SECTORS, MAX_SEGMENTS, 1)

    def process(self, index: int, queue: VirtQueue) -> None:
        while True:
            chain = queue.pop()
            if chain is None:
                return
            if not chain.writable or chain.writable[-1][1] < 1:
                raise QueueError(f"virtio-blk request {chain.head} has no status byte")
            written, status = self._handle(chain)
            addr, n = chain.writable[-1]
            self.memory.write(addr + n - 1, bytes([status]))
            queue.add_used(chain.head, written + 1)

    # --- one request -------------------------------------------------------------------

    def _handle(self, chain: Chain) -> tuple[int, int]:
        """(data bytes written into the chain, status)."""
        self.requests += 1
        header = chain.read(self.memory, 0, HEADER.size)
        if len(header) < HEADER.size:
            self.errors += 1
            return 0, S_IOERR
        kind, _, sector = HEADER.unpack(header)
        try:
            if kind == T_IN:
                return self._read(chain, sector), S_OK
            if kind == T_OUT:
                self._write(chain, sector)
            elif kind == T_FLUSH:
                self.image.flush()
            elif kind == T_GET_ID:
                return chain.write(self.memory, 0, self.serial.ljust(ID_BYTES, b"\0")[:chain.writable_len - 1]), S_OK
            elif kind in (T_DISCARD, T_WRITE_ZEROES) and not self.readonly:
                self._segments(chain, kind)
            else:
                return 0, S_UNSUPP
        except (BadRequest, ImageError) as e:
            log.debug("virtio-blk request %d: %s", chain.head, e)
            self.errors += 1
            return 0, S_IOERR
        return 0, S_OK

    def _range(self, sector: int, length: int) -> int:
        if length % SECTOR:
            raise BadRequest(f"{length} bytes is not a whole number of sectors")
        offset = sector * SECTOR
        if offset + length > self.image.size:
            raise BadRequest(f"sector {sector}+{length // SECTOR} past the end of the disk")
        return offset

    def _read(self, chain: Chain, sector: int) -> int:
        length = chain.writable_len - 1
        offset = self._range(sector, length)
        done = 0
        for addr, n in chain.writable:
            n = min(n, length - done)
            if n <= 0:
                break
            self.memory.write(addr, self.image.read(offset + done, n))
            done += n
        return done

    def _write(self, chain: Chain, sector: int) -> None:
        if self.readonly:
            raise BadRequest("write to a read-only disk")
        length = chain.readable_len - HEADER.size
        offset = self._range(sector, length)
        self.image.write(offset, chain.read(self.memory, HEADER.size, length))

    def _segments(self, chain: Chain, kind: int) -> None:
        data = chain.read(self.memory, HEADER.size, chain.readable_len - HEADER.size)
        if not data or len(data) % SEGMENT.size or len(data) // SEGMENT.size > MAX_SEGMENTS:
            raise BadRequest(f"{len(data)} bytes of discard/write-zeroes segments")
        for sector, count, flags in SEGMENT.iter_unpack(data):
            if count > MAX_DISCARD_SECTORS or flags & ~WRITE_ZEROES_UNMAP:
                raise BadRequest(f"segment of {count} sectors, flags {flags:#x}")
            offset = self._range(sector, count * SECTOR)
            if kind == T_DISCARD:
                self.image.discard(offset, count * SECTOR)
            else:
                self.image.write_zeroes(offset, count * SECTOR)

    def save_fields(self) -> dict:
        return {"requests": self.requests, "errors": self.errors}

    def restore_fields(self, state: dict) -> None:
        self.requests, self.errors = int(state.get("requests", 0)), int(state.get("errors", 0))
