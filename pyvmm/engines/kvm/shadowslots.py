"""PAM write protection under KVM: the shadow area 0xC0000-0xFFFFF as
read-only memory slots where the chipset sends writes to ROM.

The i440FX's PAM registers (devices/pci/pam.py) decide per 16 KiB range
whether guest writes reach the shadow RAM; GuestMemory.write_ignored says
which pages they do not.  bt and hybrid drop those writes in the
translator; under KVM the guest writes RAM directly, so the area gets its
own slots (one per 16 KiB, the PAM granularity) and a slot whose pages are
all write-ignored carries KVM_MEM_READONLY: reads stay plain memory,
writes exit as MMIO and, with no device there, the MMIO bus drops them.

Reads always come from the RAM copy, whatever the read-enable bits say,
as under bt: boot/firmware.py preloads the low range with the ROM's bytes.

KVM refuses to flip KVM_MEM_READONLY on a live slot, so a change deletes
the slot and adds it again (harvesting the dirty log first, since a
deleted slot loses its bitmap).  Without KVM_CAP_READONLY_MEM the slots
stay writable and one warning says so."""

from __future__ import annotations

import logging

from ...dirty import PAGE_SHIFT
from . import abi
from .device import ioctl

log = logging.getLogger(__name__)

CAP_READONLY_MEM = 81
MEM_READONLY = 1 << 1                # kvm_userspace_memory_region.flags
SHADOW_START, SHADOW_END, SHADOW_STEP = 0xC0000, 0x100000, 0x4000
SHADOW_RANGES = tuple((gpa, SHADOW_STEP) for gpa in range(SHADOW_START, SHADOW_END, SHADOW_STEP))


class ShadowSlots:
    """Keeps the read-only flag of the shadow-area slots in step with
    memory.write_ignored, from now until close()."""

    def __init__(self, kvm, vm_fd: int, memory, slots: list, dirty_log):
        self.vm_fd = vm_fd
        self.memory = memory
        self.dirty_log = dirty_log
        self.supported = bool(kvm.check(CAP_READONLY_MEM))
        self.slots = [s for s in slots if (s.guest_phys_addr, s.memory_size) in SHADOW_RANGES]
        self.changes = 0                 # slot re-registrations (diagnostics, tests)
        self._warned = False
        memory.write_ignored_listeners.append(self.follow)
        self.follow(memory.write_ignored)

    def __repr__(self) -> str:
        ro = sum(1 for s in self.slots if s.flags & MEM_READONLY)
        return f"ShadowSlots({ro}/{len(self.slots)} read-only, supported={self.supported})"

    def follow(self, pages: frozenset[int]) -> None:
        """Makes each shadow slot read-only exactly when PAM drops writes
        to all its pages."""
        wanted = []
        for s in self.slots:
            first = s.guest_phys_addr >> PAGE_SHIFT
            frames = range(first, first + (s.memory_size >> PAGE_SHIFT))
            readonly = all(f in pages for f in frames)
            if readonly != bool(s.flags & MEM_READONLY):
                wanted.append((s, readonly))
        if not wanted:
            return
        if not self.supported:
            if not self._warned:
                log.warning("KVM lacks KVM_CAP_READONLY_MEM: guest writes to PAM-protected "
                            "shadow RAM (0xC0000-0xFFFFF) land under hw")
                self._warned = True
            return
        if self.memory.dirty is not None:
            self.dirty_log.log_harvest(self.memory.dirty.add)
        for s, readonly in wanted:
            size = s.memory_size
            s.memory_size = 0
            ioctl(self.vm_fd, abi.SET_USER_MEMORY_REGION, s)
            s.memory_size = size
            s.flags = s.flags | MEM_READONLY if readonly else s.flags & ~MEM_READONLY
            ioctl(self.vm_fd, abi.SET_USER_MEMORY_REGION, s)
            self.changes += 1

    def close(self) -> None:
        if self.follow in self.memory.write_ignored_listeners:
            self.memory.write_ignored_listeners.remove(self.follow)


__all__ = ["CAP_READONLY_MEM", "MEM_READONLY", "SHADOW_RANGES", "ShadowSlots"]
