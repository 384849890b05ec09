"""The vCPU's block lookup cache (fetch linear address -> block function),
one per mode and address space.

A system call or an interrupt changes the CPU mode (CPL) and the page
maps in use, and the return changes them back; a lookup cache that is
emptied at each switch makes every block after it go through the
translator's lookup (a page-table fetch and a keyed search): measured on a
fitted-kernel boot, 644k such lookups for 3.9M blocks run.  So the cache
of the mode left is set aside and taken back on return, as long as nothing
changed what linear addresses fetch in between: a TLB flush (the MMU's
flush counter moved) or anything that clears the cache in use (code
writes, page-table writes, invlpg all call clear()), which retires every
cache set aside as well.  Set-aside caches are few (LIMIT) and go at the
first doubt."""

from __future__ import annotations

LIMIT = 8


class JumpCache(dict):
    """A lookup cache whose clear() also retires the caches set aside."""
    __slots__ = ("owner",)

    def __init__(self, owner: "JumpCaches"):
        super().__init__()
        self.owner = owner

    def clear(self) -> None:
        dict.clear(self)
        self.owner.saved.clear()


class JumpCaches:
    """One vCPU's set-aside caches.  keep=False (the hybrid engine, whose user
    code changes pages behind bt's back) empties the cache at every switch."""

    def __init__(self):
        self.saved: dict[tuple, tuple] = {}   # (mode, id(maps)) -> (maps, cache, TLB flush count)
        self.keep = True
        self.reused = 0                       # switches that found their cache set aside

    def new(self) -> JumpCache:
        return JumpCache(self)

    def switch(self, old: JumpCache, left: tuple, left_maps, entering: tuple, maps, flushes: int,
               still_valid: bool) -> JumpCache:
        """The cache for the mode being entered (`entering`, page maps `maps`,
        TLB flush count `flushes` now); `old` served mode `left` with
        `left_maps` and is still valid unless `still_valid` is False."""
        if not self.keep or not still_valid:
            self.saved.clear()
            dict.clear(old)
            return old
        if len(self.saved) >= LIMIT:
            self.saved.clear()
        self.saved[left, id(left_maps)] = (left_maps, old, flushes)
        hit = self.saved.pop((entering, id(maps)), None)
        if hit is not None and hit[0] is maps and hit[2] == flushes:
            self.reused += 1
            return hit[1]
        return JumpCache(self)
