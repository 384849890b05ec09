"""Raw images: the file is the disk. Sparse: zeros are holes, and discard
and write_zeroes punch holes with fallocate where the filesystem can."""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Iterator

from .image import Extent, ImageBase, ImageError, Status, check_range, pread_exact

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024

_libc = ctypes.CDLL(None, use_errno=True)   # the process's own libc; find_library would spawn ldconfig
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocates a file range, keeping the size; False where unsupported."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    if ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


class RawImage(ImageBase):
    format = "raw"

    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        self.readonly = readonly
        try:
            self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as e:
            raise ImageError(f"{path}: {e.strerror}") from None
        self.size = os.fstat(self.fd).st_size

    @staticmethod
    def create(path: str, size: int) -> None:
        with open(path, "wb") as f:
            f.truncate(size)

    def read(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length)
        return pread_exact(self.fd, length, offset)

    def write(self, offset: int, data: bytes) -> None:
        if self.readonly or offset < 0 or offset + len(data) > self.size:   # checked inline: once per request
            self._check_write(offset, len(data))
        os.pwrite(self.fd, data, offset)

    def writev(self, offset: int, buffers: list[memoryview]) -> None:
        """pwritev straight from `buffers` (bytes-like, one byte per item),
        IOV_MAX at a time; a short write goes on from where it stopped."""
        left = sum(map(len, buffers))
        self._check_write(offset, left)
        while left:
            batch = buffers[:IOV_MAX] if len(buffers) > IOV_MAX else buffers
            done = os.pwritev(self.fd, batch, offset)
            left -= done
            if not left:          # the usual end: everything in one call
                return
            if not done:
                raise ImageError(f"{self.path}: the host wrote nothing at offset {offset}")
            offset += done
            for i, b in enumerate(batch):
                if done < len(b):
                    buffers = [memoryview(b)[done:]] + buffers[i + 1:]
                    break
                done -= len(b)
            else:
                buffers = buffers[len(batch):]

    def flush(self) -> None:
        if not self.readonly:
            os.fsync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        punch_hole(self.fd, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        if not punch_hole(self.fd, offset, length):
            super().write_zeroes(offset, length)

    def resize(self, size: int) -> None:
        if self.readonly:
            raise ImageError(f"{self.path}: image is open read-only")
        os.ftruncate(self.fd, size)
        self.size = size

    def block_status(self, offset: int, length: int) -> Iterator[Extent]:
        """Holes (SEEK_HOLE/SEEK_DATA) read as zeros; the rest is data."""
        end = offset + length
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:
                data = end
            data = min(data, end)
            if data > pos:
                yield Extent(pos, data - pos, Status.ZERO)
                pos = data
                continue
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            hole = min(max(hole, pos + 1), end)
            yield Extent(pos, hole - pos, Status.DATA, host_offset=pos)
            pos = hole

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)
