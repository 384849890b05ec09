"""Guest memory dirty tracking: which 4 KiB guest-physical pages were
written since the log was last read.

GuestMemory owns the log (start_dirty_log, dirty_pages, stop_dirty_log);
whoever can write guest RAM behind its back feeds it as a DirtySource:

- hw: KVM's dirty log (KVM_MEM_LOG_DIRTY_PAGES on every slot,
  KVM_GET_DIRTY_LOG when the log is read);
- bt: the translator's write paths.  While the log is on, a page is mapped
  for fast writes only by a write, which marks it; reading the log unmaps
  the pages it returns, so their next write marks them again (the same
  write-protection KVM uses);
- hybrid: both (user code writes under KVM, the kernel in bt);
- the VMM itself: GuestMemory.write marks what it writes.

Reading the log takes the marked set first and re-arms tracking after, so
a write that races with the read is either in this bitmap or the next;
the caller reads page contents after dirty_pages() returns (pre-copy)."""

from __future__ import annotations

from typing import Callable, Iterator, Protocol, runtime_checkable

PAGE_SHIFT = 12


class DirtyBitmap:
    """One bit per guest-physical page frame, frame 0 first."""

    def __init__(self, frames: int, pages: set[int] | None = None):
        self.frames = frames
        self.bits = bytearray((frames + 7) // 8)
        for p in pages or ():
            if 0 <= p < frames:
                self.bits[p >> 3] |= 1 << (p & 7)

    def __contains__(self, ppn: int) -> bool:
        return 0 <= ppn < self.frames and bool(self.bits[ppn >> 3] >> (ppn & 7) & 1)

    def __iter__(self) -> Iterator[int]:
        """The dirty page frame numbers, in order."""
        for i, byte in enumerate(self.bits):
            while byte:
                low = byte & -byte
                yield i * 8 + low.bit_length() - 1
                byte ^= low

    def __len__(self) -> int:
        return sum(bin(b).count("1") for b in self.bits)

    def __repr__(self) -> str:
        return f"DirtyBitmap(frames={self.frames}, dirty={len(self)})"


@runtime_checkable
class DirtySource(Protocol):
    """An engine part that writes guest RAM without GuestMemory.write."""

    def log_start(self) -> None:
        """Tracking begins: every later write must reach `mark`."""

    def log_harvest(self, mark: Callable[[int], None]) -> None:
        """Hands pages written since the last harvest to mark(ppn) (KVM's
        bitmap); before the log's set is taken."""

    def log_rearm(self, pages: set[int]) -> None:
        """After the set `pages` was taken: make their next writes mark again."""

    def log_stop(self) -> None:
        """Tracking ends."""
