"""VMDK on-disk layout (VMware Virtual Disk Format 1.1): the hosted sparse
extent header, markers of streamOptimized extents, and the text
descriptor, as struct formats and parsers next to their constants.
Everything binary is little-endian."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from .image import CorruptImageError

SECTOR = 512
MAGIC = b"KDMV"
# magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize,
# numGTEsPerGT, rgdOffset, gdOffset, overHead, uncleanShutdown, four newline
# test chars, compressAlgorithm; padded to one sector.
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH433x")
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
GD_AT_END = 0xFFFFFFFFFFFFFFFF
NEWLINE_TEST = b"\n \r\n"
COMPRESS_DEFLATE = 1
GTE_ZEROED = 1

MARKER = struct.Struct("<QII")        # value (lba or sector count), size, type (when size is 0)
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3

GRAIN_SECTORS = 128                   # 64 KiB grains, as VMware and qemu write
GTES_PER_GT = 512
DESCRIPTOR_SECTORS = 20
MAX_GD_ENTRIES = 1 << 22              # a 256 TiB disk: more is hostile


@dataclass
class SparseHeader:
    version: int
    flags: int
    capacity: int
    grain_size: int
    descriptor_offset: int
    descriptor_size: int
    gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    unclean: int = 0
    newline: bytes = NEWLINE_TEST
    compress: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.version, self.flags, self.capacity, self.grain_size,
                           self.descriptor_offset, self.descriptor_size, self.gtes_per_gt, self.rgd_offset,
                           self.gd_offset, self.overhead, self.unclean, self.newline, self.compress)

    @classmethod
    def unpack(cls, path: str, buf: bytes, at: int = 0) -> "SparseHeader":
        if len(buf) < HEADER.size:
            raise CorruptImageError(path, at + len(buf), "file too short for a VMDK sparse header")
        fields = HEADER.unpack_from(buf)
        if fields[0] != MAGIC:
            raise CorruptImageError(path, at, "bad VMDK sparse extent magic")
        return cls(*fields[1:])


# ---- descriptor ---------------------------------------------------------

EXTENT_LINE = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(SPARSE|FLAT|ZERO|VMFS|VMFSSPARSE)'
                         r'(?:\s+"([^"]*)")?(?:\s+(\d+))?\s*$')


@dataclass
class Descriptor:
    fields: dict[str, str]
    extents: list[tuple[str, int, str, str | None, int]]   # access, sectors, type, file, offset
    ddb: dict[str, str]

    @property
    def create_type(self) -> str:
        return self.fields.get("createType", "")


def parse_descriptor(path: str, text: str) -> Descriptor:
    """Raises CorruptImageError for lines that are neither fields nor extents."""
    fields, extents, ddb = {}, [], {}
    for number, raw in enumerate(text.replace("\r", "").split("\n"), 1):
        line = raw.split("\0")[0].strip()
        if not line or line.startswith("#"):
            continue
        m = EXTENT_LINE.match(line)
        if m:
            extents.append((m[1], int(m[2]), m[3], m[4], int(m[5] or 0)))
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise CorruptImageError(path, 0, f"descriptor line {number} is not key=value: {line[:40]!r}")
        key, value = key.strip(), value.strip().strip('"')
        (ddb if key.startswith("ddb.") else fields)[key] = value
    if not extents:
        raise CorruptImageError(path, 0, "VMDK descriptor lists no extents")
    return Descriptor(fields, extents, ddb)


def format_descriptor(create_type: str, extents: list[str], *, cid: int, parent_cid: int = 0xFFFFFFFF,
                      parent_hint: str | None = None, sectors: int = 0, adapter: str = "ide") -> str:
    cylinders = min(max(sectors // (16 * 63), 1), 16383)
    lines = ["# Disk DescriptorFile", "version=1", f"CID={cid:08x}", f"parentCID={parent_cid:08x}",
             f'createType="{create_type}"']
    if parent_hint:
        lines.append(f'parentFileNameHint="{parent_hint}"')
    lines += ["", "# Extent description", *extents, "", "# The Disk Data Base", "#DDB", "",
              'ddb.virtualHWVersion = "4"', f'ddb.geometry.cylinders = "{cylinders}"',
              'ddb.geometry.heads = "16"', 'ddb.geometry.sectors = "63"', f'ddb.adapterType = "{adapter}"', ""]
    return "\n".join(lines)
