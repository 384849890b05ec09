"""virtio-blk (virtio 1.2, section 5.2) over a storage.DiskImage.

A request is a chain of: a 16-byte header (type, reserved, sector) in
device-readable buffers, data (readable for OUT, writable for IN), and one
writable status byte at the very end.  Requests answered: IN, OUT, FLUSH,
GET_ID, DISCARD and WRITE_ZEROES (segments of sector, count, flags).

Every request gets a status: a malformed one (too short, data not a whole
number of sectors, past the end of the disk, a write to a read-only disk)
gets IOERR, an unknown type UNSUPP; only a chain without room for the
status byte is a protocol error (QueueError: the transport marks the
device NEEDS_RESET).

Where the board gives the device an I/O thread (use_io_thread(), as
install.py does), a kick only reads the request from guest memory and
queues its disk work; the vCPU goes back to the guest at once.  A write's
data goes to the image straight from the guest's buffers (read-only views
of guest RAM, no copy): the driver may not touch them until the used ring
returns the chain, which happens only after the disk work.  The I/O
thread does the disk work in submission order (so a FLUSH covers every
write before it) and the machine's event loop completes each request
under the machine's lock: data into guest memory, the status byte, the
used ring, then the transport's notify, which raises the interrupt the
driver asked for.  drain() completes what is in flight (a pause waits on
it, and save() does it), reset() waits for the disk work and drops its
answers.  Without an I/O thread (unit tests) a kick does it all in place.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
from typing import Callable

from ...errors import ImageError, StateError, VmmError
from ...storage.image import DiskImage, write_vectored
from ...memory import GuestMemory
from .device import DEVICE_ID_BLOCK, VirtioDevice
from .iothread import IoThread
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
STATUS_BYTES = (b"\0", b"\1", b"\2")     # indexed by status: no bytes object built per request
WRITE_ZEROES_UNMAP = 1

HEADER = struct.Struct("<IIQ")     # type, reserved, sector
SEGMENT = struct.Struct("<QII")    # sector, num_sectors, flags
# struct virtio_blk_config up to write_zeroes_may_unmap (offsets 0..56), padded.
CONFIG = struct.Struct("<QII4xI BBHI BxH IIIIIB3x")
DRAIN_TIMEOUT_S = 30.0             # disk work that takes longer is a host problem

# A request's disk work: touches only the image, gives (bytes for the
# chain's writable part, status).
Work = Callable[[], "tuple[bytes, int]"]


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
        # Set by use_io_thread(); None: requests complete inside the kick.
        self._io: IoThread | None = None
        self._post: Callable[[Callable[[], None]], None] | None = None
        self._lock: threading.RLock | None = None
        self.wake: Callable[[int], None] | None = None      # the transport's notify
        self._done: collections.deque = collections.deque()  # (queue index, VirtQueue, Chain, data, status)
        self.in_flight = 0
        # Fault tolerance (pyvmm/ft/virtio.py) takes over where a request's
        # disk work is queued and when its answer reaches the guest, since
        # both depend on host timing: submit_hook(index, queue, chain, work)
        # instead of the I/O thread, answer_hook() instead of the event loop.
        self.submit_hook: Callable | None = None
        self.answer_hook: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"VirtioBlock({self.image.path!r}, {self.image.size} bytes, requests={self.requests})"

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.image.size // SECTOR, 0, SEG_MAX, SECTOR,
                           0, 0, 0, 0,                      # topology: 512-byte physical blocks
                           0, 1,                            # writeback (unused), num_queues
                           MAX_DISCARD_SECTORS, MAX_SEGMENTS, 1,
                           MAX_DISCARD_SECTORS, MAX_SEGMENTS, 1)

    def use_io_thread(self, io: IoThread, post: Callable[[Callable[[], None]], None],
                      lock: threading.RLock) -> None:
        """Does disk work on `io` from now on; `post(callback)` runs callback
        on the machine's event loop under `lock`, where requests complete.
        Set `wake` to the transport's notify as well."""
        self._io, self._post, self._lock = io, post, lock

    def process(self, index: int, queue: VirtQueue) -> None:
        while True:
            chain = queue.pop()
            if chain is None:
                return
            if not chain.writable or chain.writable[-1][1] < 1:
                raise QueueError(f"virtio-blk request {chain.head} has no status byte")
            work = self._request(chain)
            if self._io is None:
                self._complete(queue, chain, *work())
                continue
            self.in_flight += 1
            if self.submit_hook is not None:
                self.submit_hook(index, queue, chain, work)
            else:
                self.start_io(index, queue, chain, work)

    def start_io(self, index: int, queue: VirtQueue, chain: Chain, work: Work) -> None:
        """Queues a popped request's disk work on the I/O thread."""
        self._io.submit(lambda i=index, q=queue, c=chain, w=work: self._run(i, q, c, w))

    # --- off the vCPU thread -----------------------------------------------------------

    def _run(self, index: int, queue: VirtQueue, chain: Chain, work: Work) -> None:
        """On the I/O thread: the disk work, its answer handed to the loop."""
        try:
            data, status = work()
        except Exception:    # a bug or a host error the image did not wrap: the guest sees IOERR
            log.exception("virtio-blk request %d failed", chain.head)
            data, status = b"", S_IOERR
        self._done.append((index, queue, chain, data, status))
        if self.answer_hook is not None:
            self.answer_hook()
        else:
            self._post(self._complete_ready)

    def answer(self, index: int, queue: VirtQueue, chain: Chain, data: bytes, status: int) -> None:
        """Completes a popped request with an answer from elsewhere (an FT
        backup replaying the primary's), under the machine's lock."""
        self._done.append((index, queue, chain, data, status))
        self._complete_ready()

    def _complete_ready(self, observe: Callable[[Chain, bytes, int], None] | None = None) -> None:
        """On the event loop (or a drain), under the machine's lock: completes
        the answered requests in order, then lets the transport interrupt.
        `observe(chain, data, status)` sees each answer before the guest does."""
        woken = []
        while self._done:
            index, queue, chain, data, status = self._done.popleft()
            if observe is not None:
                observe(chain, data, status)
            self.in_flight -= 1
            try:
                self._complete(queue, chain, data, status)
            except VmmError as e:    # the chain was checked at pop(); RAM cannot shrink
                log.warning("virtio-blk request %d: cannot complete: %s", chain.head, e)
            if index not in woken:
                woken.append(index)
        for index in woken:
            if self.wake is not None:
                self.wake(index)     # also takes requests queued since the kick

    def complete_answered(self, observe: Callable[[Chain, bytes, int], None]) -> None:
        """Completes the answered requests, each shown to `observe` first
        (an FT primary logs it). Under the machine's lock."""
        self._complete_ready(observe)

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Completes every request in flight, into guest memory and the used
        ring. Any thread but the I/O thread. Raises StateError when the disk
        work does not finish within `timeout` seconds, and under FT, whose
        held or replayed requests are not this device's to finish."""
        if self.submit_hook is not None and self.in_flight:
            raise StateError(f"virtio-blk {self.image.path}: requests under fault tolerance cannot be drained")
        while self._io is not None:
            if not self._io.wait_idle(timeout):
                raise StateError(f"virtio-blk {self.image.path}: disk requests did not finish in {timeout:.0f} s")
            with self._lock:
                self._complete_ready()
                if not self.in_flight:
                    return

    def finish_submitted(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Waits until the disk work submitted so far has touched the image
        (its completion may still be on the way to the guest): a job looks
        `self.image` up when it runs, so once this returns every write goes
        through whatever `image` is now.  Raises StateError on timeout."""
        if self._io is not None and not self._io.barrier(timeout):
            raise StateError(f"virtio-blk {self.image.path}: disk requests did not finish in {timeout:.0f} s")

    def _discard(self) -> None:
        """Lets the disk work in flight finish and drops its answers (the
        driver reset the device, or a restore replaced its queues)."""
        if self._io is not None:
            if not self._io.wait_idle(DRAIN_TIMEOUT_S):
                log.warning("virtio-blk %s: disk requests still running at reset", self.image.path)
            self._done.clear()
            self.in_flight = 0

    def stop_io(self) -> None:
        """Runs the submitted disk work and ends the I/O thread (before the
        image closes)."""
        if self._io is not None:
            self._io.stop()

    def reset(self) -> None:
        self._discard()
        super().reset()

    # --- one request -------------------------------------------------------------------

    def _complete(self, queue: VirtQueue, chain: Chain, data: bytes, status: int) -> None:
        written = chain.write(self.memory, 0, data) if data else 0
        if status == S_IOERR:
            self.errors += 1
        addr, n = chain.writable[-1]
        self.memory.write(addr + n - 1, STATUS_BYTES[status])
        queue.add_used(chain.head, written + 1)

    def _request(self, chain: Chain) -> Work:
        """Reads what request `chain` brings from guest memory (on the
        kicking thread) and returns its disk work."""
        self.requests += 1
        header = chain.read(self.memory, 0, HEADER.size)
        if len(header) < HEADER.size:
            return _answer(S_IOERR)
        kind, _, sector = HEADER.unpack(header)
        try:
            if kind == T_IN:
                length = chain.writable_len - 1
                offset = self._range(sector, length)
                return self._disk(chain.head, lambda: self.image.read(offset, length))
            if kind == T_OUT:
                return self._disk(chain.head, self._write(chain, sector))
            if kind == T_FLUSH:
                return self._disk(chain.head, self.image.flush)
            if kind == T_GET_ID:
                return _answer(S_OK, self.serial.ljust(ID_BYTES, b"\0")[:chain.writable_len - 1])
            if kind in (T_DISCARD, T_WRITE_ZEROES) and not self.readonly:
                return self._disk(chain.head, self._segments(chain, kind))
            return _answer(S_UNSUPP)
        except BadRequest as e:
            log.debug("virtio-blk request %d: %s", chain.head, e)
            return _answer(S_IOERR)

    def _disk(self, head: int, op: Callable[[], "bytes | None"]) -> Work:
        def work() -> tuple[bytes, int]:
            try:
                return op() or b"", S_OK
            except ImageError as e:
                log.debug("virtio-blk request %d: %s", head, e)
                return b"", S_IOERR
        return work

    def _range(self, sector: int, length: int) -> int:
        if length % SECTOR:
            raise BadRequest(f"{length} bytes is not a whole number of sectors")
        offset = sector * SECTOR
        if offset + length > self.image.size:
            raise BadRequest(f"sector {sector}+{length // SECTOR} past the end of the disk")
        return offset

    def _write(self, chain: Chain, sector: int) -> Callable[[], None]:
        if self.readonly:
            raise BadRequest("write to a read-only disk")
        length = chain.readable_len - HEADER.size
        offset = self._range(sector, length)
        # Straight from guest RAM, no copy: the driver leaves the buffers
        # alone until the chain is used, as it would under a disk's DMA.
        # The views live only as long as the request's work.
        views = chain.views(self.memory, HEADER.size)
        if len(views) == 1:
            view = views[0]
            return lambda: self.image.write(offset, view)
        return lambda: write_vectored(self.image, offset, views)

    def _segments(self, chain: Chain, kind: int) -> Callable[[], None]:
        data = chain.read(self.memory, HEADER.size, chain.readable_len - HEADER.size)
        if not data or len(data) % SEGMENT.size or len(data) // SEGMENT.size > MAX_SEGMENTS:
            raise BadRequest(f"{len(data)} bytes of discard/write-zeroes segments")
        ranges = []
        for sector, count, flags in SEGMENT.iter_unpack(data):
            if count > MAX_DISCARD_SECTORS or flags & ~WRITE_ZEROES_UNMAP:
                raise BadRequest(f"segment of {count} sectors, flags {flags:#x}")
            ranges.append((self._range(sector, count * SECTOR), count * SECTOR))
        op = self.image.discard if kind == T_DISCARD else self.image.write_zeroes

        def run() -> None:
            for offset, length in ranges:
                op(offset, length)
        return run

    def save_fields(self) -> dict:
        self.drain()     # no half-done request in a snapshot (a paused machine has none)
        return {"requests": self.requests, "errors": self.errors}

    def restore_fields(self, state: dict) -> None:
        self._discard()  # answers for the queues being replaced
        self.requests, self.errors = int(state.get("requests", 0)), int(state.get("errors", 0))


def _answer(status: int, data: bytes = b"") -> Work:
    """The work of a request answered without the disk."""
    return lambda: (data, status)
