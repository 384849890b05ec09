"""qcow2 on-disk layout (docs/interop/qcow2.txt in QEMU's tree): the header,
its extensions, table entry bits and the snapshot table entry, as struct
formats next to their constants. Everything is big-endian."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .image import CorruptImageError, UnsupportedImageError

MAGIC = b"QFI\xfb"

# magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
# crypt_method, l1_size, l1_table_offset, refcount_table_offset,
# refcount_table_clusters, nb_snapshots, snapshots_offset
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
# incompatible_features, compatible_features, autoclear_features, refcount_order, header_length
HEADER_V3_TAIL = struct.Struct(">QQQII")
HEADER_V3_LENGTH = HEADER_V2.size + HEADER_V3_TAIL.size  # 104

# Byte offsets of header fields that are rewritten in place; pairs that
# change together are adjacent, so one pwrite switches them at once.
OFF_SIZE = 24
OFF_L1 = 36                 # l1_size u32, l1_table_offset u64
OFF_REFTABLE = 48           # refcount_table_offset u64, refcount_table_clusters u32
OFF_SNAPSHOTS = 60          # nb_snapshots u32, snapshots_offset u64
OFF_INCOMPAT = 72
L1_FIELDS = struct.Struct(">IQ")
REFTABLE_FIELDS = struct.Struct(">QI")
SNAPSHOT_FIELDS = struct.Struct(">IQ")
U64 = struct.Struct(">Q")

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT
COMPAT_LAZY_REFCOUNTS = 1 << 0

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_DATA_FILE = 0x44415441
EXT_HEADER = struct.Struct(">II")

# Table entries.
OFLAG_COPIED = 1 << 63       # refcount is exactly 1: may be written in place
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0          # v3 L2 entry: reads as zeros
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20       # qemu's limits: bigger tables are hostile, not disks
MAX_REFTABLE_BYTES = 8 << 20
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536

# Snapshot table entry: l1_table_offset, l1_size, id_str_size, name_size,
# date_sec, date_nsec, vm_clock_nsec, vm_state_size, extra_data_size.
SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")
SNAPSHOT_EXTRA = struct.Struct(">QQ")   # vm_state_size_large, disk_size

# What an L2 entry maps a guest cluster to.
UNALLOCATED, ZERO, DATA, COMPRESSED = "unallocated", "zero", "data", "compressed"



@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V2.size
    backing_file: str | None = None
    backing_format: str | None = None
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def pack(self) -> bytes:
        """Header, extensions and the backing file name, as one cluster 0 prefix."""
        fixed = HEADER_V2.pack(MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
                               self.cluster_bits, self.size, self.crypt_method, self.l1_size,
                               self.l1_table_offset, self.refcount_table_offset,
                               self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset)
        if self.version >= 3:
            fixed += HEADER_V3_TAIL.pack(self.incompatible, self.compatible, self.autoclear,
                                         self.refcount_order, HEADER_V3_LENGTH)
        ext = b""
        if self.backing_format:
            ext += _extension(EXT_BACKING_FORMAT, self.backing_format.encode())
        for kind, data in self.unknown_extensions:
            ext += _extension(kind, data)
        if self.version >= 3:
            ext += EXT_HEADER.pack(EXT_END, 0)
        out = fixed + ext
        if self.backing_file:
            name = self.backing_file.encode()
            self.backing_file_offset, self.backing_file_size = len(out), len(name)
            fixed = HEADER_V2.pack(MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
                                   self.cluster_bits, self.size, self.crypt_method, self.l1_size,
                                   self.l1_table_offset, self.refcount_table_offset,
                                   self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset)
            out = fixed + out[HEADER_V2.size:] + name
        if len(out) > self.cluster_size:
            raise UnsupportedImageError("qcow2 header and backing file name do not fit in one cluster")
        return out


def _extension(kind: int, data: bytes) -> bytes:
    return EXT_HEADER.pack(kind, len(data)) + data + bytes(-len(data) % 8)


def parse_header(path: str, buf: bytes, file_size: int) -> Header:
    """Parses and checks cluster 0. Raises CorruptImageError naming the
    offending offset, UnsupportedImageError for features pyvmm lacks."""
    if len(buf) < HEADER_V2.size:
        raise CorruptImageError(path, len(buf), "file too short for a qcow2 header")
    fields = HEADER_V2.unpack_from(buf)
    if fields[0] != MAGIC:
        raise CorruptImageError(path, 0, "not a qcow2 image (bad magic)")
    h = Header(*fields[1:])
    if h.version not in (2, 3):
        raise UnsupportedImageError(f"{path}: qcow2 version {h.version} is not supported")
    if h.version == 3:
        if len(buf) < HEADER_V3_LENGTH:
            raise CorruptImageError(path, len(buf), "file too short for a qcow2 v3 header")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = HEADER_V3_TAIL.unpack_from(buf, HEADER_V2.size)
        if not HEADER_V3_LENGTH <= h.header_length <= len(buf):
            raise CorruptImageError(path, 100, f"header_length {h.header_length} outside 104..cluster size")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImageError(path, 20, f"cluster_bits {h.cluster_bits} outside 9..21")
    cs = h.cluster_size
    if h.crypt_method:
        raise UnsupportedImageError(f"{path}: encrypted qcow2 images are not supported")
    if h.refcount_order > 6:
        raise CorruptImageError(path, 96, f"refcount_order {h.refcount_order} above 6")
    unknown = h.incompatible & ~INCOMPAT_KNOWN
    if unknown & INCOMPAT_DATA_FILE:
        raise UnsupportedImageError(f"{path}: qcow2 external data files are not supported")
    if unknown & INCOMPAT_COMPRESSION:
        raise UnsupportedImageError(f"{path}: qcow2 compression types other than zlib are not supported")
    if unknown & INCOMPAT_EXTL2:
        raise UnsupportedImageError(f"{path}: qcow2 extended L2 entries are not supported")
    if unknown:
        raise UnsupportedImageError(f"{path}: unknown qcow2 incompatible features 0x{unknown:x}")
    _check_table(path, 40, h.l1_table_offset, h.l1_size * 8, cs, file_size, MAX_L1_BYTES, "L1 table")
    needed_l1 = -(-h.size // (cs * (cs // 8)))
    if h.l1_size < needed_l1:
        raise CorruptImageError(path, 36, f"L1 table of {h.l1_size} entries too small for a {h.size}-byte disk")
    _check_table(path, 48, h.refcount_table_offset, h.refcount_table_clusters * cs, cs, file_size,
                 MAX_REFTABLE_BYTES, "refcount table")
    if h.refcount_table_clusters == 0:
        raise CorruptImageError(path, 56, "refcount table has no clusters")
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImageError(path, 60, f"{h.nb_snapshots} snapshots is too many")
    if h.nb_snapshots and (h.snapshots_offset % cs or h.snapshots_offset >= file_size):
        raise CorruptImageError(path, 64, f"snapshot table offset 0x{h.snapshots_offset:x} is invalid")
    _parse_extensions(path, buf, h)
    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME or h.backing_file_offset + h.backing_file_size > min(cs, len(buf)):
            raise CorruptImageError(path, 8, "backing file name lies outside the header cluster")
        h.backing_file = buf[h.backing_file_offset:h.backing_file_offset + h.backing_file_size].decode(
            "utf-8", "replace")
    return h


def _check_table(path: str, field_offset: int, offset: int, nbytes: int, cs: int, file_size: int,
                 limit: int, what: str) -> None:
    if nbytes > limit:
        raise CorruptImageError(path, field_offset, f"{what} of {nbytes} bytes is too large")
    if offset % cs:
        raise CorruptImageError(path, field_offset, f"{what} offset 0x{offset:x} not cluster aligned")
    if nbytes and offset + nbytes > file_size:
        raise CorruptImageError(path, offset, f"{what} lies past the end of the file ({file_size} bytes)")


def _parse_extensions(path: str, buf: bytes, h: Header) -> None:
    if h.version < 3:
        return  # v2 may have extensions too, but only after 72: qemu writes none we need
    pos = h.header_length
    end = h.backing_file_offset or min(len(buf), h.cluster_size)
    while pos + EXT_HEADER.size <= end:
        kind, length = EXT_HEADER.unpack_from(buf, pos)
        if kind == EXT_END:
            return
        data_at = pos + EXT_HEADER.size
        if data_at + length > end:
            raise CorruptImageError(path, pos, f"header extension 0x{kind:08x} runs past the header")
        data = buf[data_at:data_at + length]
        if kind == EXT_BACKING_FORMAT:
            h.backing_format = data.decode("ascii", "replace")
        elif kind != EXT_FEATURE_TABLE:
            h.unknown_extensions.append((kind, bytes(data)))
        pos = data_at + length + (-length % 8)


def compressed_geometry(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, byte count) of a compressed L2 entry."""
    x = 62 - (cluster_bits - 8)
    host = entry & ((1 << x) - 1)
    sectors = (entry >> x) & ((1 << (cluster_bits - 8)) - 1)
    return host, (sectors + 1) * 512 - (host & 511)


def compressed_entry(host: int, nbytes: int, cluster_bits: int) -> int:
    x = 62 - (cluster_bits - 8)
    sectors = ((host + nbytes - 1) >> 9) - (host >> 9)
    return OFLAG_COMPRESSED | (sectors << x) | host
