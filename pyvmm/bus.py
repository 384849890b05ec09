"""One Bus class; a VM has one instance for I/O ports and one for MMIO.

A device knows only offsets inside its own range; where it sits is decided by
whoever inserts it (the builder).  What the bus dispatches to is the
`Registers` half of the device contract (device.py): a Device, or a window
onto part of one (OffsetView, the PIC's ELCR, the PIT's port 0x61).

`rep ins/outs` is looped here, once for every engine (read_many/write_many):
the device still sees one access per element."""

from __future__ import annotations

import bisect
import logging
import struct
import threading
from dataclasses import dataclass

from .device import Registers
from .errors import BusError

log = logging.getLogger(__name__)

_MISS = object()
ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
_ELEMENT = {1: "B", 2: "H", 4: "I", 8: "Q"}    # struct codes of rep ins/outs elements


@dataclass
class _Mapping:
    base: int
    length: int
    device: Registers
    name: str
    serialize: bool = False     # dispatch under the bus lock
    reads: int = 0
    writes: int = 0

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """Address space of devices. Refuses overlapping ranges.

    Reads of unmapped addresses return all-ones and writes are dropped; both
    are counted. With `serialize` set (several vCPUs), dispatch holds `lock`,
    the machine's, which the event loop (loop.py) holds around every
    callback; with one vCPU the bus skips it (it costs ~10 % of an exit round
    trip) except for devices that say INPUT_FROM_LOOP (the UART, which the
    console feeds from the loop), so no device takes a lock of its own."""

    def __init__(self, name: str, lock: threading.RLock | None = None, serialize: bool = True):
        self.name = name
        self.lock = lock or threading.RLock()
        self.serialize = serialize
        self._bases: list[int] = []
        self._maps: list[_Mapping] = []
        self.unmapped_reads = 0
        self.unmapped_writes = 0
        # addr -> mapping (None: unmapped), so hot ports skip the bisect.
        self._cache: dict[int, _Mapping | None] = {}

    def __repr__(self) -> str:
        return f"Bus({self.name}, {len(self._maps)} devices)"

    def insert(self, base: int, length: int, device: Registers, name: str | None = None) -> None:
        """Places device at [base, base+length). Raises BusError on overlap."""
        if length <= 0:
            raise BusError(f"{self.name}: zero-length range at 0x{base:x}")
        i = bisect.bisect_right(self._bases, base)
        if i > 0 and self._maps[i - 1].end > base:
            other = self._maps[i - 1]
            raise BusError(f"{self.name}: 0x{base:x}+0x{length:x} overlaps {other.name} at 0x{other.base:x}")
        if i < len(self._maps) and base + length > self._maps[i].base:
            other = self._maps[i]
            raise BusError(f"{self.name}: 0x{base:x}+0x{length:x} overlaps {other.name} at 0x{other.base:x}")
        self._bases.insert(i, base)
        self._maps.insert(i, _Mapping(base, length, device, name or type(device).__name__,
                                      self.serialize or getattr(device, "INPUT_FROM_LOOP", False)))
        self._cache.clear()

    def remove(self, base: int) -> None:
        i = self._bases.index(base)
        del self._bases[i]
        del self._maps[i]
        self._cache.clear()

    def find(self, addr: int) -> _Mapping | None:
        try:
            return self._cache[addr]
        except KeyError:
            pass
        found = None
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0 and addr < self._maps[i].end:
            found = self._maps[i]
        if len(self._cache) < 4096:  # MMIO addresses are many; ports few
            self._cache[addr] = found
        return found

    def devices(self) -> list[tuple[int, int, str]]:
        return [(m.base, m.length, m.name) for m in self._maps]

    def read(self, addr: int, size: int) -> int:
        m = self._cache.get(addr, _MISS)
        if m is _MISS:
            m = self.find(addr)
        if m is None:
            self.unmapped_reads += 1
            return ALL_ONES[size]
        m.reads += 1
        if m.serialize:
            with self.lock:
                return m.device.read(addr - m.base, size)
        return m.device.read(addr - m.base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        m = self._cache.get(addr, _MISS)
        if m is _MISS:
            m = self.find(addr)
        if m is None:
            self.unmapped_writes += 1
            return
        m.writes += 1
        if m.serialize:
            with self.lock:
                m.device.write(addr - m.base, size, value)
        else:
            m.device.write(addr - m.base, size, value)

    def read_many(self, addr: int, size: int, count: int) -> bytes:
        """`count` reads of `size` bytes at one address (`rep ins`), packed
        little-endian in order: the device sees each element, as with read()."""
        m = self._cache.get(addr, _MISS)
        if m is _MISS:
            m = self.find(addr)
        if m is None:
            self.unmapped_reads += count
            return b"\xff" * (size * count)
        m.reads += count
        read, offset, mask = m.device.read, addr - m.base, ALL_ONES[size]
        if m.serialize:
            with self.lock:
                return b"".join([(read(offset, size) & mask).to_bytes(size, "little") for _ in range(count)])
        return b"".join([(read(offset, size) & mask).to_bytes(size, "little") for _ in range(count)])

    def write_many(self, addr: int, size: int, data: bytes) -> None:
        """One write of `size` bytes at one address per element of `data`
        (`rep outs`), in order; a short tail element is dropped."""
        m = self._cache.get(addr, _MISS)
        if m is _MISS:
            m = self.find(addr)
        count = len(data) // size
        if m is None:
            self.unmapped_writes += count
            return
        m.writes += count
        write, offset = m.device.write, addr - m.base
        values = struct.unpack_from(f"<{count}{_ELEMENT[size]}", data)
        if m.serialize:
            with self.lock:
                for v in values:
                    write(offset, size, v)
        else:
            for v in values:
                write(offset, size, v)

    def stats(self) -> dict:
        """Accesses per device name, plus unmapped counts."""
        out = {m.name: {"reads": m.reads, "writes": m.writes} for m in self._maps}
        out["unmapped"] = {"reads": self.unmapped_reads, "writes": self.unmapped_writes}
        return out


class OffsetView:
    """Presents part of a device at another place: offsets are shifted by `delta`.

    Lets one device with a hole in its range (the i8042 at 0x60 and 0x64,
    with the PIT's port 0x61 between) sit on the bus as two ranges."""

    def __init__(self, device: Registers, delta: int):
        self.device = device
        self.delta = delta

    def __repr__(self) -> str:
        return f"OffsetView({self.device!r}, +{self.delta})"

    def read(self, offset: int, size: int) -> int:
        return self.device.read(offset + self.delta, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.device.write(offset + self.delta, size, value)
