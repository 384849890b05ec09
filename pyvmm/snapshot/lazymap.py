"""Guest RAM backed by a snapshot file: pages mapped in place, read on
first touch (file-backed MAP_PRIVATE, as Firecracker restores memory).

Each call replaces part of a guest RAM region at the same host address
(MAP_FIXED), so every pointer into RAM that the engines hold (KVM memory
slots, the translator's views) stays valid; KVM sees the change through
the kernel's MMU notifiers. Writes stay private to this process: the file
is never changed."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import queue
import re
import threading

from ..errors import VmmError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000
PROT_NONE = 0
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
PAGE = mmap.PAGESIZE


class LazyMapError(VmmError):
    """Guest RAM could not be remapped (the host refused: out of map slots or memory)."""


def _map(address: int, length: int, flags: int, fd: int, offset: int) -> None:
    if address % PAGE or length % PAGE or offset % PAGE:
        raise LazyMapError(f"lazy RAM: 0x{address:x}+0x{length:x} at file offset 0x{offset:x} is not page-aligned")
    got = _libc.mmap(address, length, PROT_RW, flags | MAP_FIXED, fd, offset)
    if got == MAP_FAILED or got != address:
        err = ctypes.get_errno()
        raise LazyMapError(f"lazy RAM: mmap of 0x{length:x} bytes failed: {os.strerror(err)}")


def map_file(address: int, length: int, fd: int, offset: int) -> None:
    """Makes host memory [address, address+length) a private copy-on-write
    view of file `fd` from `offset`. Raises LazyMapError."""
    _map(address, length, mmap.MAP_PRIVATE, fd, offset)


def map_zero(address: int, length: int) -> None:
    """Makes host memory [address, address+length) fresh zero pages (what
    was mapped there, anonymous or file, goes). Raises LazyMapError."""
    _map(address, length, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)


def set_aside(address: int, length: int) -> int | None:
    """Moves the pages of [address, address+length) to a spare range (mremap
    moves page tables, not pages) and makes the range fresh zero pages;
    returns the spare range for free_later(), or None when the host would
    not move them and they were freed in place. Unmapping what a guest
    touched costs time in proportion to it (14 ms per 128 MiB here), and
    holds the lock every mmap call needs: a restore maps first and frees
    after. Raises LazyMapError."""
    spare = _libc.mmap(None, length, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if spare in (MAP_FAILED, None):
        map_zero(address, length)
        return None
    if _libc.mremap(address, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, spare) != spare:
        _libc.munmap(spare, length)
        map_zero(address, length)
        return None
    map_zero(address, length)      # the hole the move left becomes fresh zero pages
    return spare


class _Freer:
    """One thread that gives set-aside pages back to the host, so that a
    restore neither waits for that nor for a thread to start."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def put(self, address: int, length: int) -> None:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="pyvmm-ram-free", daemon=True)
                self.thread.start()
        self.queue.put((address, length))

    def _run(self) -> None:
        while True:
            address, length = self.queue.get()
            _libc.munmap(address, length)
            self.queue.task_done()


_freer = _Freer()


def free_later(spare: int | None, length: int) -> None:
    """Frees a range set_aside() returned, on the freer thread."""
    if spare is not None:
        _freer.put(spare, length)


def wait_freed() -> None:
    """Returns once every range given to free_later() is freed."""
    _freer.queue.join()


def map_zero_fast(address: int, length: int) -> None:
    """map_zero, with the old pages freed on the freer thread."""
    free_later(set_aside(address, length), length)


# /proc/self/pagemap: one u64 per page; its top byte holds the flags.
PAGEMAP_PRESENT, PAGEMAP_SWAPPED, PAGEMAP_FILE, PAGEMAP_EXCLUSIVE = 0x80, 0x40, 0x20, 0x01
# 1 for a page this process wrote since it was mapped: present, anonymous
# and its own (a private file page once copied on write; a zero page only
# read is the kernel's shared zero page, not exclusive), or swapped out
# (only anonymous pages swap); 0 for one still the file's, or never written.
_WRITTEN = bytes(1 if (b & PAGEMAP_PRESENT and not b & PAGEMAP_FILE and b & PAGEMAP_EXCLUSIVE)
                 or b & PAGEMAP_SWAPPED else 0 for b in range(256))
_RUN_OF_ONES = re.compile(b"\x01+")


def written_pages(address: int, length: int) -> list[tuple[int, int]]:
    """(offset, length) runs, in bytes from `address`, of the pages written
    since [address, address+length) was mapped by map_file or map_zero:
    what a write did to a private mapping is the one thing the kernel keeps
    apart (copy on write), for every writer alike (vCPUs under any engine,
    the VMM's devices). Raises LazyMapError when pagemap cannot be read."""
    first, count = address // PAGE, length // PAGE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            entries = os.pread(f.fileno(), count * 8, first * 8)
    except OSError as e:
        raise LazyMapError(f"lazy RAM: cannot read /proc/self/pagemap: {e.strerror or e}") from None
    if len(entries) != count * 8:
        raise LazyMapError("lazy RAM: /proc/self/pagemap is short")
    marks = entries[7::8].translate(_WRITTEN)            # the flag byte of each entry, as 1 or 0
    return [(m.start() * PAGE, (m.end() - m.start()) * PAGE) for m in _RUN_OF_ONES.finditer(marks)]
