"""The DiskImage contract every format implements, its errors, and
`open_image`, which probes a file's format and opens the right module.

A DiskImage knows only guest byte offsets inside a virtual disk of `size`
bytes; where the bytes live on the host is the format module's business.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, runtime_checkable

from ..errors import ImageError

__all__ = ["ImageError", "CorruptImageError", "UnsupportedImageError", "DiskImage", "Extent", "Status",
           "open_image", "probe_format", "check_range", "write_vectored", "MAX_BACKING_DEPTH"]

# A chain deeper than this is taken for a loop that realpath() did not catch
# (e.g. through /proc); qemu stops at a similar depth.
MAX_BACKING_DEPTH = 64


class CorruptImageError(ImageError):
    """Metadata that contradicts itself; names the file offset involved."""

    def __init__(self, path: str, offset: int, what: str):
        super().__init__(f"{path}: corrupt image at offset 0x{offset:x}: {what}")
        self.path = path
        self.offset = offset


class UnsupportedImageError(ImageError):
    """A valid image using a feature pyvmm does not implement."""


class Status(enum.Enum):
    """What `block_status` says about a guest range (as qemu-img map does)."""
    DATA = "data"              # stored in this image
    ZERO = "zero"              # reads as zeros, decided by this image
    UNALLOCATED = "unallocated"  # this image has nothing: the backing file decides


@dataclass
class Extent:
    """A run of guest bytes with one status; `host_offset` for raw-mapped DATA."""
    start: int
    length: int
    status: Status
    host_offset: int | None = None
    compressed: bool = False


@runtime_checkable
class DiskImage(Protocol):
    """A virtual disk. read/write raise ImageError for a range past `size`."""

    path: str
    format: str
    size: int
    readonly: bool
    backing: "DiskImage | None"

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...
    def writev(self, offset: int, buffers: "list[memoryview]") -> None: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def block_status(self, offset: int, length: int) -> Iterator[Extent]: ...
    def close(self) -> None: ...
    def __enter__(self) -> "DiskImage": ...
    def __exit__(self, *exc) -> None: ...


class ImageBase:
    """Shared plumbing: range checks, context manager, repr, sparse copy helpers."""

    path: str
    format: str = "?"
    size: int = 0
    readonly: bool = True
    backing: "DiskImage | None" = None
    closed: bool = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<{type(self).__name__} {self.path!r} {self.format} {self.size} bytes {mode}>"

    def _check_write(self, offset: int, length: int) -> None:
        if self.readonly:
            raise ImageError(f"{self.path}: image is open read-only")
        check_range(self, offset, length)

    def writev(self, offset: int, buffers: "list[memoryview]") -> None:
        """Writes `buffers` one after the other from `offset` (what write()
        of their concatenation does); formats without a vectored path join
        them.  Keeps no reference to them past the call."""
        self.write(offset, buffers[0] if len(buffers) == 1 else b"".join(buffers))

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        chunk = bytes(min(length, 1 << 20))
        while length:
            n = min(length, len(chunk))
            self.write(offset, chunk[:n])
            offset += n
            length -= n

    def block_status(self, offset: int, length: int) -> Iterator[Extent]:
        yield Extent(offset, length, Status.DATA)

    def backing_chain(self) -> list["DiskImage"]:
        chain, image = [], self.backing
        while image is not None:
            chain.append(image)
            image = image.backing
        return chain


def write_vectored(image, offset: int, buffers: "list[memoryview]") -> None:
    """Writes `buffers` one after the other from `offset`: with writev where
    the image's own class has it, else (a wrapper that forwards unknown
    attributes would skip its own write()) one write() of their join."""
    if hasattr(type(image), "writev"):
        image.writev(offset, buffers)
    else:
        image.write(offset, b"".join(buffers))


def check_range(image, offset: int, length: int) -> None:
    """Raises ImageError unless [offset, offset+length) lies inside the disk."""
    if offset < 0 or length < 0 or offset + length > image.size:
        raise ImageError(f"{image.path}: access at offset {offset}+{length} outside the {image.size}-byte disk")


def probe_format(path: str) -> str:
    """'qcow2', 'vmdk' or 'raw' from the file's first bytes. Raises ImageError."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}") from None
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:4] == b"KDMV" or head[:4] == b"COWD" or head.lstrip().startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    return "raw"


FORMATS = ("raw", "qcow2", "vmdk")
# format name -> opener(path, readonly, seen): filled by formats.py, which the
# package imports, so this module needs none of the format modules.
OPENERS: dict[str, Callable[[str, bool, tuple[str, ...]], "DiskImage"]] = {}


def open_image(path: str, fmt: str | None = None, readonly: bool = False, *,
               _seen: tuple[str, ...] = ()) -> DiskImage:
    """Opens `path` as `fmt` (probed when None), backing files included,
    read-only. Raises ImageError for a missing, unreadable, corrupt or
    unsupported image and for a looped or too deep backing chain."""
    real = os.path.realpath(path)
    if real in _seen:
        raise ImageError(f"{path}: backing chain loops back to this file")
    if len(_seen) >= MAX_BACKING_DEPTH:
        raise ImageError(f"{path}: backing chain deeper than {MAX_BACKING_DEPTH}")
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory")
    fmt = fmt or probe_format(path)
    opener = OPENERS.get(fmt)
    if opener is None:
        raise ImageError(f"unknown image format {fmt!r} (known: {', '.join(FORMATS)})")
    return opener(path, readonly, (*_seen, real))


def open_backing(owner_path: str, name: str, fmt: str | None, seen: tuple[str, ...]) -> DiskImage:
    """Opens a backing file named in `owner_path`'s metadata: relative names
    are relative to the owner's directory, as qemu resolves them."""
    if not os.path.isabs(name) and ":" not in name.split("/")[0]:
        name = os.path.join(os.path.dirname(os.path.abspath(owner_path)), name)
    if not os.path.exists(name):
        raise ImageError(f"{owner_path}: backing file {name} not found")
    return open_image(name, fmt or None, readonly=True, _seen=seen)


def read_from_backing(backing: DiskImage | None, offset: int, length: int) -> bytes:
    """Bytes of the backing file at offset; zeros past its end or without one."""
    if backing is None or offset >= backing.size:
        return bytes(length)
    n = min(length, backing.size - offset)
    data = backing.read(offset, n)
    return data if n == length else data + bytes(length - n)


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """pread that pads a read past EOF with zeros (sparse tails, truncated files)."""
    data = os.pread(fd, length, offset)
    if len(data) < length:
        data += bytes(length - len(data))
    return data
