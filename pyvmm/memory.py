"""Guest physical memory: anonymous mmap regions with bounds-checked access.

Both engines use the same object: KVM maps the regions into the guest as
memory slots, the binary translator reads and writes them directly.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass
from typing import Callable

from .dirty import PAGE_SHIFT, DirtyBitmap, DirtySource
from .errors import ConfigError, GuestMemoryError, StateError

GIB = 1 << 30
# RAM above this goes above 4 GiB, leaving the hole for the APIC, IOAPIC and
# other MMIO, as on a PC.
LOW_RAM_LIMIT = 3 * GIB
HIGH_RAM_BASE = 4 * GIB

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass
class MemoryRegion:
    gpa: int
    size: int
    mm: mmap.mmap
    # A firmware image (the BIOS at the top of 4 GiB): mapped like RAM,
    # but no part of the guest's RAM size or memory map.
    rom: bool = False

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def host_address(self) -> int:
        """Host virtual address of the region's first byte (for KVM memory slots)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mm))


class GuestMemory:
    """Guest RAM as a list of non-overlapping regions.

    Every access is checked against the regions: an access that is not wholly
    inside one region raises GuestMemoryError, so a guest or a device can never
    reach host memory outside the guest's RAM."""

    def __init__(self, size: int):
        if size <= 0 or size % mmap.PAGESIZE:
            raise ConfigError(f"guest memory size {size} is not a positive number of pages")
        self.size = size
        self.regions: list[MemoryRegion] = []
        low = min(size, LOW_RAM_LIMIT)
        self._add(0, low)
        if size > low:
            self._add(HIGH_RAM_BASE, size - low)
        # Called as fn(gpa, length) after the VMM itself writes guest memory
        # (loaders, DMA from devices), so that translated code can be dropped.
        self.write_listeners: list[Callable[[int, int], None]] = []
        # The dirty log (dirty.py): page frames written since it was last
        # read, or None while it is off; engines register their sources.
        self.dirty: set[int] | None = None
        self.dirty_sources: list[DirtySource] = []
        # Page frames whose guest writes are dropped (shadow RAM that the
        # chipset's PAM registers make read-only, devices/pci/pam.py);
        # engines listen so that they stop writing those pages directly.
        self.write_ignored: frozenset[int] = frozenset()
        self.write_ignored_listeners: list[Callable[[frozenset[int]], None]] = []

    def _add(self, gpa: int, size: int, rom: bool = False) -> MemoryRegion:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region = MemoryRegion(gpa, size, mm, rom)
        self.regions.append(region)
        return region

    def add_rom(self, gpa: int, data: bytes) -> None:
        """Maps a firmware image at gpa (whole pages, before the engine
        starts). Raises ConfigError when it overlaps a region."""
        if gpa % mmap.PAGESIZE or not data or len(data) % mmap.PAGESIZE:
            raise ConfigError(f"firmware image at 0x{gpa:x}: not whole pages")
        if any(gpa < r.end and r.gpa < gpa + len(data) for r in self.regions):
            raise ConfigError(f"firmware image at 0x{gpa:x} overlaps guest memory")
        self._add(gpa, len(data), rom=True).mm[:] = data

    def set_write_ignored(self, pages: frozenset[int]) -> None:
        """Guest writes to page frames `pages` are dropped from now on (the
        VMM's own writes still land); tells the engines."""
        if pages != self.write_ignored:
            self.write_ignored = pages
            for fn in self.write_ignored_listeners:
                fn(pages)

    def __repr__(self) -> str:
        parts = ", ".join(f"0x{r.gpa:x}+0x{r.size:x}" for r in self.regions)
        return f"GuestMemory({parts})"

    def close(self) -> None:
        for r in self.regions:
            try:
                r.mm.close()
            except BufferError:
                pass  # a ctypes view still exists; the mapping goes with the process

    # -- lookup -------------------------------------------------------------
    def locate(self, gpa: int, size: int) -> tuple[mmap.mmap, int]:
        """Returns (mapping, offset) for [gpa, gpa+size) inside one region.

        Raises GuestMemoryError when the range is not wholly RAM."""
        for r in self.regions:
            off = gpa - r.gpa
            if 0 <= off and off + size <= r.size:
                return r.mm, off
        raise GuestMemoryError(gpa, size)

    def is_ram(self, gpa: int, size: int = 1) -> bool:
        end = gpa + size
        for r in self.regions:      # a loop, not any(): this runs per translated block
            if r.gpa <= gpa and end <= r.end:
                return True
        return False

    def ram_ranges(self) -> list[tuple[int, int]]:
        """(start, length) of each RAM region, for e820 maps and the like."""
        return [(r.gpa, r.size) for r in self.regions if not r.rom]

    # -- bytes --------------------------------------------------------------
    def read(self, gpa: int, size: int) -> bytes:
        mm, off = self.locate(gpa, size)
        return mm[off:off + size]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        mm, off = self.locate(gpa, len(data))
        mm[off:off + len(data)] = data
        if self.dirty is not None:
            self.mark_dirty(gpa, len(data))
        for fn in self.write_listeners:
            fn(gpa, len(data))

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * size)

    def view(self, gpa: int, size: int) -> memoryview:
        """A writable memoryview over guest RAM (no copy, no write listeners:
        a device that writes through it calls mark_dirty itself)."""
        mm, off = self.locate(gpa, size)
        return memoryview(mm)[off:off + size]

    # -- integers -----------------------------------------------------------
    def read_u8(self, gpa: int) -> int:
        mm, off = self.locate(gpa, 1)
        return mm[off]

    def read_u16(self, gpa: int) -> int:
        mm, off = self.locate(gpa, 2)
        return _U16.unpack_from(mm, off)[0]

    def read_u32(self, gpa: int) -> int:
        mm, off = self.locate(gpa, 4)
        return _U32.unpack_from(mm, off)[0]

    def read_u64(self, gpa: int) -> int:
        mm, off = self.locate(gpa, 8)
        return _U64.unpack_from(mm, off)[0]

    def write_u8(self, gpa: int, value: int) -> None:
        self.write(gpa, bytes([value & 0xFF]))

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, _U16.pack(value & 0xFFFF))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, _U32.pack(value & 0xFFFFFFFF))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, _U64.pack(value & 0xFFFFFFFFFFFFFFFF))

    # -- objects ------------------------------------------------------------
    def read_obj(self, gpa: int, ctype: type) -> ctypes.Structure:
        """Reads a ctypes structure (a copy) from guest memory."""
        return ctype.from_buffer_copy(self.read(gpa, ctypes.sizeof(ctype)))

    def write_obj(self, gpa: int, obj: ctypes.Structure | ctypes.Array) -> None:
        self.write(gpa, bytes(obj))

    # -- dirty log (dirty.py) -----------------------------------------------
    @property
    def frames(self) -> int:
        """Page frames a dirty bitmap covers: up to the end of the highest region."""
        return max(r.end for r in self.regions) >> PAGE_SHIFT

    def start_dirty_log(self) -> None:
        """Starts recording written pages. Raises StateError when it is on already."""
        if self.dirty is not None:
            raise StateError("the dirty log is already on")
        self.dirty = set()
        for src in self.dirty_sources:
            src.log_start()

    def mark_dirty(self, gpa: int, size: int = 1) -> None:
        """Records a write of [gpa, gpa+size) (no-op while the log is off)."""
        if self.dirty is not None:
            self.dirty.update(range(gpa >> PAGE_SHIFT, ((gpa + max(size, 1) - 1) >> PAGE_SHIFT) + 1))

    def dirty_pages(self) -> DirtyBitmap:
        """The pages written since the log started or was last read, and
        clears it. Raises StateError when the log is off."""
        if self.dirty is None:
            raise StateError("the dirty log is off")
        mark = self.dirty.add
        for src in self.dirty_sources:
            src.log_harvest(mark)
        taken, self.dirty = self.dirty, set()
        for src in self.dirty_sources:
            src.log_rearm(taken)
        return DirtyBitmap(self.frames, taken)

    def stop_dirty_log(self) -> None:
        """Stops recording (what was not read is dropped)."""
        if self.dirty is None:
            return
        self.dirty = None
        for src in self.dirty_sources:
            src.log_stop()
