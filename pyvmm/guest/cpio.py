"""The "newc" cpio format (magic 070701) that Linux unpacks as an initramfs.

Each entry is a 110-byte ASCII header (the magic and thirteen 8-digit hex
fields), the NUL-terminated name, padding to a multiple of 4 bytes, then the
data padded to a multiple of 4.  The archive ends with an entry named
TRAILER!!!.  Names are stored without a leading "/", as the kernel's
gen_init_cpio does."""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

from ..errors import ImageError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
# magic + ino mode uid gid nlink mtime filesize devmajor devminor
#         rdevmajor rdevminor namesize check
HEADER_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
                 "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")
HEADER = struct.Struct("6s" + "8s" * len(HEADER_FIELDS))
assert HEADER.size == 110


def _pad4(n: int) -> int:
    return (-n) & 3


@dataclass
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime: int = 0
    ino: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_char_device(self) -> bool:
        return stat.S_ISCHR(self.mode)


def _clean_name(path: str) -> str:
    """Raises ImageError for names the kernel would not accept."""
    name = path.lstrip("/")
    if not name or "\0" in name or name == TRAILER:
        raise ImageError(f"bad cpio entry name {path!r}")
    return name


class CpioWriter:
    """Builds a newc archive in memory. Entries are written in the order
    added, so add a directory before what it contains."""

    def __init__(self, mtime: int = 0):
        self.mtime = mtime
        self._buf = bytearray()
        self._next_ino = 1
        self._names: set[str] = set()
        self._finished = False

    def __repr__(self) -> str:
        return f"CpioWriter({len(self._names)} entries, {len(self._buf)} bytes)"

    def _entry(self, path: str, mode: int, data: bytes = b"", nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        if self._finished:
            raise ImageError("cpio archive already finished")
        name = _clean_name(path)
        if name in self._names:
            raise ImageError(f"duplicate cpio entry {name!r}")
        self._names.add(name)
        self._append(name, mode, data, nlink, rdev, self._next_ino)
        self._next_ino += 1

    def _append(self, name: str, mode: int, data: bytes, nlink: int,
                rdev: tuple[int, int], ino: int) -> None:
        encoded = name.encode() + b"\0"
        values = {
            "ino": ino, "mode": mode, "uid": 0, "gid": 0, "nlink": nlink,
            "mtime": self.mtime, "filesize": len(data), "devmajor": 0, "devminor": 0,
            "rdevmajor": rdev[0], "rdevminor": rdev[1], "namesize": len(encoded), "check": 0,
        }
        for key, v in values.items():
            if not 0 <= v <= 0xFFFFFFFF:
                raise ImageError(f"cpio field {key}={v} of {name!r} out of range")
        header = HEADER.pack(MAGIC, *(b"%08X" % values[f] for f in HEADER_FIELDS))
        self._buf += header + encoded
        self._buf += b"\0" * _pad4(len(header) + len(encoded))
        self._buf += data
        self._buf += b"\0" * _pad4(len(data))

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._entry(path, stat.S_IFDIR | (mode & 0o7777), nlink=2)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(path, stat.S_IFREG | (mode & 0o7777), bytes(data))

    def add_symlink(self, path: str, target: str) -> None:
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(path, stat.S_IFCHR | (mode & 0o7777), rdev=(major, minor))

    def finish(self) -> bytes:
        """Appends the trailer and returns the archive. Raises ImageError if
        called twice."""
        if self._finished:
            raise ImageError("cpio archive already finished")
        self._append(TRAILER, 0, b"", 1, (0, 0), 0)
        self._finished = True
        return bytes(self._buf)


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parses a newc archive up to its trailer (which is not returned).
    Raises ImageError on a bad magic, a truncated entry or a missing trailer."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if pos + HEADER.size > len(data):
            raise ImageError(f"cpio archive truncated at offset {pos} (no trailer)")
        fields = HEADER.unpack_from(data, pos)
        if fields[0] != MAGIC:
            raise ImageError(f"bad cpio magic {fields[0]!r} at offset {pos}")
        try:
            h = {name: int(raw, 16) for name, raw in zip(HEADER_FIELDS, fields[1:])}
        except ValueError:
            raise ImageError(f"bad cpio header at offset {pos}") from None
        name_start = pos + HEADER.size
        name_end = name_start + h["namesize"]
        data_start = name_end + _pad4(HEADER.size + h["namesize"])
        data_end = data_start + h["filesize"]
        if h["namesize"] == 0 or data_end > len(data):
            raise ImageError(f"cpio entry at offset {pos} runs past the end")
        raw_name = data[name_start:name_end]
        if not raw_name.endswith(b"\0"):
            raise ImageError(f"cpio name at offset {pos} is not NUL-terminated")
        name = raw_name[:-1].decode("utf-8", "surrogateescape")
        if name == TRAILER:
            return entries
        entries.append(CpioEntry(
            name=name, mode=h["mode"], data=bytes(data[data_start:data_end]), uid=h["uid"],
            gid=h["gid"], nlink=h["nlink"], mtime=h["mtime"], ino=h["ino"],
            rdevmajor=h["rdevmajor"], rdevminor=h["rdevminor"]))
        pos = data_end + _pad4(h["filesize"])
