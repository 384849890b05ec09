"""The host-cache modes of `--drive cache=`, with QEMU's meanings:

    mode          host page cache   guest flush    every write
    writeback     used              fsync          -
    writethrough  used              fsync          followed by fsync
    none          bypassed          fsync          -
    directsync    bypassed          fsync          followed by fsync
    unsafe        used              ignored        -

"Bypassed" is O_DIRECT on a second descriptor of a raw image's file:
requests whose offset and length are multiples of DIRECT_ALIGN go through
it with a page-aligned bounce buffer (O_DIRECT wants aligned memory too);
the rare unaligned ones take the ordinary descriptor, which Linux keeps
coherent with direct I/O.  Where the host file system has no O_DIRECT
(tmpfs before Linux 6.6), or the image is not raw, the mode falls back to the cached one
with the same flush behaviour (none -> writeback, directsync ->
writethrough) and logs one warning line.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading

from ..errors import ConfigError
from .image import write_vectored

log = logging.getLogger(__name__)

CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")
DIRECT_ALIGN = 4096
BOUNCE_SIZE = 1 << 20        # larger aligned requests go in pieces of this size


def check_cache_mode(mode: str) -> None:
    """Raises ConfigError for a mode QEMU does not have."""
    if mode not in CACHE_MODES:
        raise ConfigError(f"unknown cache mode {mode!r} (choose from {', '.join(CACHE_MODES)})")


class CachedImage:
    """`image` (a DiskImage) in cache mode `mode`; every other attribute is
    the image's own."""

    def __init__(self, image, mode: str):
        check_cache_mode(mode)
        self.image = image
        self.mode = mode
        self.write_through = mode in ("writethrough", "directsync")
        self.ignore_flush = mode == "unsafe"
        self.direct_fd = -1
        self.direct_requests = 0          # requests that went around the page cache
        self._bounce_lock = threading.Lock()   # one bounce buffer, whichever thread does the I/O
        if mode in ("none", "directsync"):
            self._open_direct()

    def __repr__(self) -> str:
        return f"CachedImage({self.image!r}, cache={self.mode}, direct={self.direct_fd >= 0})"

    def __getattr__(self, name: str):
        return getattr(self.image, name)

    def _open_direct(self) -> None:
        path = getattr(self.image, "path", None)
        if getattr(self.image, "format", None) != "raw" or path is None:
            why = "the image is not raw"
        else:
            flags = (os.O_RDONLY if self.image.readonly else os.O_RDWR) | os.O_DIRECT
            fd = -1
            try:
                fd = os.open(path, flags)
                self._bounce = mmap.mmap(-1, BOUNCE_SIZE)     # page-aligned anonymous memory
                if self.image.size >= DIRECT_ALIGN:         # some refuse only at the first I/O
                    os.preadv(fd, [memoryview(self._bounce)[:DIRECT_ALIGN]], 0)
                self.direct_fd = fd
                return
            except OSError as e:
                if fd >= 0:
                    os.close(fd)
                why = f"the host file system refuses O_DIRECT ({e.strerror})"
        log.warning("%s: cache=%s: %s; using the host page cache", path or self.image, self.mode, why)

    def _aligned(self, offset: int, length: int) -> bool:
        return self.direct_fd >= 0 and not (offset | length) % DIRECT_ALIGN and length > 0

    # --- the DiskImage calls whose meaning the mode changes --------------------------------

    def read(self, offset: int, length: int) -> bytes:
        if not self._aligned(offset, length) or offset + length > self.image.size:
            return self.image.read(offset, length)
        with self._bounce_lock:
            return self._read_direct(offset, length)

    def _read_direct(self, offset: int, length: int) -> bytes:
        self.direct_requests += 1
        out = bytearray()
        while length:
            n = min(length, BOUNCE_SIZE)
            got = os.preadv(self.direct_fd, [memoryview(self._bounce)[:n]], offset)
            if got < n:       # a short read at the file's end: the rest the ordinary way
                out += self._bounce[:got]
                out += self.image.read(offset + got, length - got)
                return bytes(out)
            out += self._bounce[:n]
            offset += n
            length -= n
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        if self._aligned(offset, len(data)) and offset + len(data) <= self.image.size:
            self.image._check_write(offset, len(data))
            with self._bounce_lock:
                self.direct_requests += 1
                view = memoryview(data)
                while view:
                    n = min(len(view), BOUNCE_SIZE)
                    self._bounce[:n] = view[:n]
                    os.pwritev(self.direct_fd, [memoryview(self._bounce)[:n]], offset)
                    view = view[n:]
                    offset += n
        else:
            self.image.write(offset, data)
        if self.write_through:
            self.image.flush()

    def writev(self, offset: int, buffers: list[memoryview]) -> None:
        """write() of the buffers' concatenation: one join where O_DIRECT
        takes the request (it goes through the bounce buffer anyway),
        the image's own vectored write where it does not."""
        length = sum(len(b) for b in buffers)
        if self._aligned(offset, length) and offset + length <= self.image.size:
            self.write(offset, b"".join(buffers))     # flushes itself in write-through
            return
        write_vectored(self.image, offset, buffers)
        if self.write_through:
            self.image.flush()

    def discard(self, offset: int, length: int) -> None:
        self.image.discard(offset, length)
        if self.write_through:
            self.image.flush()

    def write_zeroes(self, offset: int, length: int) -> None:
        self.image.write_zeroes(offset, length)
        if self.write_through:
            self.image.flush()

    def flush(self) -> None:
        if not self.ignore_flush:
            self.image.flush()

    def close(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1
            self._bounce.close()
        self.image.close()


def with_cache_mode(image, mode: str):
    """`image` as the mode wants it (itself for writeback). Raises ConfigError."""
    check_cache_mode(mode)
    return image if mode == "writeback" else CachedImage(image, mode)


__all__ = ["CACHE_MODES", "CachedImage", "check_cache_mode", "with_cache_mode"]
