"""Block migration (`migrate` with "blk": true): the drives' contents
travel with the guest, for a destination whose images are its own (empty
images of the same sizes), as QEMU's block migration does.

While the migration runs, each virtio-blk device writes through a
DirtyBlocks wrapper that marks the CHUNK-sized pieces a write, discard or
write-zeroes touched, after the operation (a chunk read between the two
is sent again).  The first pass sends every chunk that is not all zero;
each later RAM pass sends the chunks written since; the last ones go
while the guest is stopped, before the device state.

BLOCKS records hold runs of (drive index in the CONFIG record's "blocks"
list, byte offset, length, zero or data); the destination writes them
into its drives.  Everything raises StreamError for a bad record."""

from __future__ import annotations

import struct
import threading
from typing import TYPE_CHECKING, Iterator

from ..storage.image import write_vectored
from .stream import StreamError

if TYPE_CHECKING:
    from ..machine import Machine

CHUNK = 64 << 10
BLOCK_RUN = struct.Struct(">HQIB")
MAX_BLOCK_RUNS = 1024
MAX_BLOCK_BYTES = 4 << 20
ZERO, DATA = 0, 1


class DirtyBlocks:
    """A drive's image as its device sees it, recording written chunks."""

    def __init__(self, inner):
        self.inner = inner
        self.dirty: set[int] = set()
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def _mark(self, offset: int, length: int) -> None:
        with self._lock:
            self.dirty.update(range(offset // CHUNK, (offset + max(length, 1) - 1) // CHUNK + 1))

    def write(self, offset: int, data) -> None:
        self.inner.write(offset, data)
        self._mark(offset, len(data))

    def writev(self, offset: int, buffers) -> None:
        write_vectored(self.inner, offset, buffers)
        self._mark(offset, sum(len(b) for b in buffers))

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)
        self._mark(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.inner.write_zeroes(offset, length)
        self._mark(offset, length)

    def take(self) -> list[int]:
        """The chunks written since the last take, sorted; clears them."""
        with self._lock:
            taken, self.dirty = self.dirty, set()
        return sorted(taken)


def _devices(machine: "Machine") -> dict[str, object]:
    """The writable drives' virtio-blk devices by drive name."""
    from ..snapshot.savevm import drives
    out = {}
    for name, drive in drives(machine).items():
        device = getattr(machine.devices.get(name.replace("-", "_")), "device", None)
        if device is not None and not drive.readonly:
            out[name] = device
    return out


class BlockSender:
    """Tracks and reads the source's drives for one migration."""

    def __init__(self, machine: "Machine"):
        self.devices = _devices(machine)
        self.names = sorted(self.devices)
        self.trackers: dict[str, DirtyBlocks] = {}

    def describe(self) -> list[dict]:
        """The CONFIG record's "blocks": each drive's name and size."""
        return [{"name": n, "size": self.devices[n].image.size} for n in self.names]

    def start(self) -> None:
        """Tracks every drive's writes from here on.  A write its I/O thread
        had already picked the untracked image for lands before this returns,
        so the first pass (which reads every chunk after it) carries it."""
        for name, device in self.devices.items():
            self.trackers[name] = device.image = DirtyBlocks(device.image)
        for device in self.devices.values():
            device.finish_submitted()

    def stop(self) -> None:
        for name, tracker in self.trackers.items():
            self.devices[name].image = tracker.inner
        self.trackers = {}

    def all_chunks(self) -> Iterator[tuple[int, int]]:
        for i, name in enumerate(self.names):
            size = self.devices[name].image.size
            for c in range((size + CHUNK - 1) // CHUNK):
                yield i, c

    def dirty_chunks(self) -> list[tuple[int, int]]:
        return [(i, c) for i, name in enumerate(self.names) for c in self.trackers[name].take()]

    def records(self, chunks, skip_zero: bool) -> Iterator[list]:
        """BLOCKS records (as buffers) carrying `chunks` (drive index, chunk)."""
        from . import stream
        head, data, size = [], [], 0
        zero = bytes(CHUNK)
        for i, c in chunks:
            image = self.trackers[self.names[i]].inner
            offset = c * CHUNK
            length = min(CHUNK, image.size - offset)
            payload = image.read(offset, length)
            if payload == zero[:length]:
                if skip_zero:
                    continue
                head.append(BLOCK_RUN.pack(i, offset, length, ZERO))
            else:
                head.append(BLOCK_RUN.pack(i, offset, length, DATA))
                data.append(payload)
                size += length
            if len(head) >= MAX_BLOCK_RUNS or size > MAX_BLOCK_BYTES - CHUNK:
                yield stream.record(stream.BLOCKS, [struct.pack(">I", len(head)) + b"".join(head), *data])
                head, data, size = [], [], 0
        if head:
            yield stream.record(stream.BLOCKS, [struct.pack(">I", len(head)) + b"".join(head), *data])


def check_drives(machine: "Machine", described) -> list:
    """The destination's devices for the source's "blocks" list, in its
    order. Raises StreamError when a drive is missing or of another size."""
    if described is None:
        return []
    devices = _devices(machine)
    out = []
    try:
        for d in described:
            device = devices.get(d["name"])
            if device is None:
                raise StreamError(f"block migration: this machine has no writable drive {d['name']!r}")
            if device.image.size != int(d["size"]):
                raise StreamError(f"block migration: drive {d['name']!r} is {device.image.size} bytes here, "
                                  f"{int(d['size'])} on the source")
            out.append(device)
    except (KeyError, TypeError, ValueError) as e:
        raise StreamError(f"migration stream: the drive list is malformed ({e})") from None
    return out


def apply(devices: list, payload: bytes) -> None:
    """Writes one BLOCKS record into the destination's drives."""
    if len(payload) < 4:
        raise StreamError("migration stream blocks record is truncated")
    (count,) = struct.unpack_from(">I", payload)
    pos = 4 + count * BLOCK_RUN.size
    if count > MAX_BLOCK_RUNS or pos > len(payload):
        raise StreamError("migration stream blocks record is truncated or has too many runs")
    runs = []
    for k in range(count):
        i, offset, length, kind = BLOCK_RUN.unpack_from(payload, 4 + k * BLOCK_RUN.size)
        if i >= len(devices) or not 0 < length <= CHUNK or kind not in (ZERO, DATA) \
                or offset + length > devices[i].image.size:
            raise StreamError(f"migration stream has a bad block run (drive {i}, 0x{offset:x}+0x{length:x})")
        if kind == DATA:
            if pos + length > len(payload):
                raise StreamError("migration stream blocks record is truncated")
            runs.append((i, offset, payload[pos:pos + length]))
            pos += length
        else:
            runs.append((i, offset, length))
    if pos != len(payload):
        raise StreamError("migration stream blocks record has trailing bytes")
    for i, offset, data in runs:
        image = devices[i].image
        if isinstance(data, int):
            image.write_zeroes(offset, data)
        else:
            image.write(offset, data)
