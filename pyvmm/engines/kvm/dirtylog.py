"""KVM's dirty log as a DirtySource (pyvmm/dirty.py).

While the log is on, every memory slot carries KVM_MEM_LOG_DIRTY_PAGES:
KVM write-protects the slot's pages and sets a bit for each page the
guest writes.  KVM_GET_DIRTY_LOG hands over a slot's bitmap and clears
it (protecting the pages again), so harvesting is all that re-arms it.

A slot that is deleted loses its bitmap: whoever re-registers slots while
the log is on (the hybrid engine drops KVM's cached translations that
way) harvests first and keeps the flag in the region it registers again."""

from __future__ import annotations

import ctypes
from typing import Callable

from ...dirty import PAGE_SHIFT
from . import abi
from .device import ioctl


class KvmDirtyLog:
    """The dirty log of one VM's memory slots (`regions`: the very
    UserspaceMemoryRegion objects the engine registers, so a re-registration
    keeps the flag). Raises OSError when KVM refuses an ioctl."""

    def __init__(self, vm_fd: int, regions: list[abi.UserspaceMemoryRegion]):
        self.vm_fd = vm_fd
        self.regions = regions
        self._bitmaps = [(ctypes.c_uint64 * ((r.memory_size >> PAGE_SHIFT) // 64 + 1))() for r in regions]

    def _set_flags(self, flags: int) -> None:
        for r in self.regions:
            r.flags = (r.flags & ~abi.MEM_LOG_DIRTY_PAGES) | flags   # a read-only slot stays so
            ioctl(self.vm_fd, abi.SET_USER_MEMORY_REGION, r)

    def log_start(self) -> None:
        self._set_flags(abi.MEM_LOG_DIRTY_PAGES)

    def log_harvest(self, mark: Callable[[int], None]) -> None:
        for r, bitmap in zip(self.regions, self._bitmaps):
            if not r.flags & abi.MEM_LOG_DIRTY_PAGES:
                continue
            ioctl(self.vm_fd, abi.GET_DIRTY_LOG,
                  abi.DirtyLog(r.slot, 0, ctypes.addressof(bitmap)))
            base = r.guest_phys_addr >> PAGE_SHIFT
            for i, word in enumerate(bitmap):
                while word:
                    low = word & -word
                    mark(base + i * 64 + low.bit_length() - 1)
                    word ^= low

    def log_rearm(self, pages: set[int]) -> None:
        """Nothing to do: KVM_GET_DIRTY_LOG protected the pages again."""

    def log_stop(self) -> None:
        self._set_flags(0)


def register_memory(vm, memory, split: tuple[tuple[int, int], ...] = ()
                    ) -> tuple[list[abi.UserspaceMemoryRegion], KvmDirtyLog]:
    """Maps every region of GuestMemory `memory` as slots of KvmVm `vm` and
    joins the VM's dirty log to the memory's sources; returns (the slots, as
    the very objects a re-registration must reuse, the log).  Each
    (gpa, length) of `split` wholly inside a region gets a slot of its own,
    so that its flags can change apart from the rest (shadowslots.py)."""
    slots = []
    for region in memory.regions:
        cuts = {region.gpa, region.end}
        for gpa, length in split:
            if region.gpa <= gpa and gpa + length <= region.end:
                cuts.update((gpa, gpa + length))
        edges = sorted(cuts)
        for start, end in zip(edges, edges[1:]):
            host = region.host_address() + start - region.gpa
            slot = vm.add_memory(start, end - start, host)
            slots.append(abi.UserspaceMemoryRegion(slot, 0, start, end - start, host))
    log = KvmDirtyLog(vm.fd, slots)
    memory.dirty_sources.append(log)
    return slots, log
