"""Snapshots of guest page-table pages, for out-of-sync shadow tables.

A page table the shadow MMU has read is copied when it is first tracked.
Once the guest writes it, the page is left writable ("out of sync") and
compared with its copy at the next TLB flush: only the entries whose
words changed lose the shadow translations built from them.

Words are compared 4 bytes at a time, so one routine serves 32-bit
(4-byte) and PAE / 4-level (8-byte) tables; a caller maps a changed word
at byte offset `o` to the entry at `o` (4-byte tables) or `o & ~7`
(8-byte tables).  Nothing here raises.
"""

from __future__ import annotations

PAGE = 0x1000
CHUNK = 256        # bytes compared at once before looking at single words


class TableSnap:
    """The last synced contents of one guest page-table page, and where the
    page lives in guest RAM (mapping, offset)."""

    __slots__ = ("mm", "off", "data")

    def __init__(self, mm, off: int):
        self.mm = mm
        self.off = off
        self.data = bytearray(mm[off:off + PAGE])

    def __repr__(self) -> str:
        return f"TableSnap(off={self.off:#x})"

    def current(self) -> bytes:
        return self.mm[self.off:self.off + PAGE]

    def changed(self, cur: bytes) -> list[int]:
        """Byte offsets of the 4-byte words that differ between the copy and
        `cur` (the page's present contents), in increasing order."""
        old = self.data
        if old == cur:
            return []
        out = []
        for j in range(0, PAGE, CHUNK):
            if old[j:j + CHUNK] != cur[j:j + CHUNK]:
                a = memoryview(old)[j:j + CHUNK].cast("I")
                b = memoryview(cur)[j:j + CHUNK].cast("I")
                out.extend(j + 4 * i for i in range(CHUNK // 4) if a[i] != b[i])
        return out

    def take(self, cur: bytes) -> None:
        """The page is in sync again: `cur` becomes the copy."""
        self.data[:] = cur

    def refresh(self, off: int, size: int) -> bool:
        """Copies the `size`-byte entry at `off` from the page; True when the
        copy held another value."""
        cur = self.mm[self.off + off:self.off + off + size]
        if self.data[off:off + size] == cur:
            return False
        self.data[off:off + size] = cur
        return True

    def or_bits(self, off: int, bits: int) -> None:
        """The MMU set accessed/dirty `bits` (all in an entry's low byte) in
        the entry at byte offset `off`: the copy follows, so that only
        the guest's own changes count as changes."""
        self.data[off] |= bits
