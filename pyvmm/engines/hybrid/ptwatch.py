"""Deciding when KVM's cached page-table translations have gone stale.

Under the hybrid engine the guest kernel (in bt) edits page tables with
plain memory writes that KVM never sees, while KVM keeps translations built
from those tables (shadow paging on kvm_pvm and on any host without
EPT/NPT).  Dropping KVM's cache on every entry is correct but costs a
memory-slot re-registration plus a refault of every page user code then
touches.  This watch keeps a copy of every page-table page of the user half
of each address space KVM ran since the last drop, and at the next entry
compares them:

- no page changed, or only changes KVM cannot have cached: a not-present
  entry became present (demand paging: KVM faults and walks again), or the
  accessed/dirty bits were set (KVM itself sets them) -> keep the cache;
- a present entry changed any other way (unmap, COW write-protect, remap,
  A/D cleared) -> drop it (the caller re-registers the slots) and start over.

The copies are taken again after each KVM run (after_run): KVM sets A and
D in the guest's tables while user code runs and caches the entry as
accessed/dirty.  Compared against a copy from before the run, a bit that
KVM set and the kernel then cleared (page aging, MADV_FREE) would look
unchanged, KVM would not set it again on the next access, and the kernel
could free a page user code had written.

Only 4-level long-mode paging is watched; any other paging mode asks for a
drop on every entry.  Nothing here raises."""

from __future__ import annotations

import struct

PRESENT, PS = 1, 1 << 7
AD = (1 << 5) | (1 << 6)
ADDR = 0x000FFFFFFFFFF000
USER_HALF = 2048          # bytes of a PML4 page that map the lower half (user space)
MAX_PAGES = 2048          # watched pages before a drop is cheaper than comparing
ENTRIES = struct.Struct("<512Q")
HALF = struct.Struct("<256Q")


class PageTableWatch:
    def __init__(self, memory):
        self.memory = memory
        self.pages: dict[int, tuple[int, bytes]] = {}   # table gpa -> (level, contents)
        self.roots: set[int] = set()
        self.drops = 0
        self.checks = 0

    def _read(self, gpa: int, level: int) -> bytes | None:
        size = USER_HALF if level == 4 else 0x1000
        if not self.memory.is_ram(gpa, size):
            return None
        return self.memory.read(gpa, size)

    def _add_tree(self, gpa: int, level: int) -> None:
        """Watches table page gpa (of `level`, 4 = PML4) and every table below it."""
        if gpa in self.pages:
            return
        data = self._read(gpa, level)
        if data is None:
            return
        self.pages[gpa] = (level, data)
        if level > 1:
            self._add_children(data, level, None)

    def _add_children(self, data: bytes, level: int, old: bytes | None) -> None:
        unpack = HALF.unpack if level == 4 else ENTRIES.unpack
        entries = unpack(data)
        before = unpack(old) if old is not None else None
        for i, e in enumerate(entries):
            if not e & PRESENT or (level < 4 and e & PS):
                continue
            if before is not None and before[i] == e:
                continue
            self._add_tree(e & ADDR, level - 1)

    @staticmethod
    def _stale(level: int, old: bytes, new: bytes) -> bool:
        """True when a change from old to new may leave KVM a wrong translation."""
        unpack = HALF.unpack if level == 4 else ENTRIES.unpack
        for o, n in zip(unpack(old), unpack(new)):
            if o == n or not o & PRESENT:
                continue
            if (o ^ n) & ~AD or o & ~n & AD:
                return True
        return False

    def needs_drop(self, cr3: int, long_mode_paging: bool) -> bool:
        """Checks the watched tables before KVM runs with root cr3; True means
        the caller must drop KVM's translations (the watch then restarts
        from cr3's tree alone)."""
        self.checks += 1
        if not long_mode_paging:
            self.reset(None)
            return True
        root = cr3 & ADDR
        for gpa, (level, old) in list(self.pages.items()):
            new = self._read(gpa, level)
            if new == old:
                continue
            if new is None or self._stale(level, old, new):
                self.reset(root)
                return True
            self.pages[gpa] = (level, new)
            if level > 1:
                self._add_children(new, level, old)
        if root not in self.roots:
            self.roots.add(root)
            self._add_tree(root, 4)
        if len(self.pages) > MAX_PAGES:
            self.reset(root)
            return True
        return False

    def after_run(self) -> None:
        """Takes the copies again once KVM stopped: what changed since
        needs_drop is only the A/D bits KVM set (bt did not run), and the
        next check must see the kernel clear them."""
        for gpa, (level, old) in list(self.pages.items()):
            new = self._read(gpa, level)
            if new is not None and new != old:
                self.pages[gpa] = (level, new)

    def reset(self, root: int | None) -> None:
        """Forgets everything (KVM's cache was dropped); watches root's tree."""
        self.drops += 1
        self.pages.clear()
        self.roots.clear()
        if root is not None:
            self.roots.add(root)
            self._add_tree(root, 4)
