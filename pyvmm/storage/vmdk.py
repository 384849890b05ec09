"""VMDK images (VMware's Virtual Disk Format 1.1 specification).

A VMDK is a text descriptor plus extents. The descriptor either sits in the
first extent (monolithicSparse, streamOptimized) or is its own small file
(monolithicFlat, twoGbMaxExtentSparse). A hosted sparse extent maps grains
through a grain directory (GD) of grain tables (GT); streamOptimized
extents hold deflated grains behind markers, with the GD in a footer.

Read: all four subformats. Write: monolithicSparse (grains appended,
GT entries updated in place) and streamOptimized (grains appended, tables
and footer rewritten at the end on close).
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from typing import Iterator

from .image import (CorruptImageError, Extent, ImageBase, ImageError, Status, UnsupportedImageError, check_range,
                    open_backing, pread_exact, read_from_backing)
from .checkresult import CheckResult
from .vmdk_layout import (COMPRESS_DEFLATE, DESCRIPTOR_SECTORS, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NL_DETECT,
                          FLAG_RGD, GD_AT_END, GRAIN_SECTORS, GTE_ZEROED, GTES_PER_GT, MAGIC, MARKER, MARKER_FOOTER,
                          MARKER_GD, MARKER_GT, MAX_GD_ENTRIES, SECTOR, SparseHeader, format_descriptor,
                          parse_descriptor)


# ---- extents ------------------------------------------------------------

class FlatExtent:
    def __init__(self, path: str, sectors: int, offset_sectors: int, readonly: bool):
        self.path = path
        self.length = sectors * SECTOR
        self.base = offset_sectors * SECTOR
        try:
            self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as e:
            raise ImageError(f"{path}: {e.strerror}") from None

    def read(self, offset: int, length: int, parent) -> bytes:
        return pread_exact(self.fd, length, self.base + offset)

    def status(self, offset: int) -> tuple[Status, int, int | None]:
        return Status.DATA, self.length - offset, self.base + offset

    def close(self) -> None:
        os.close(self.fd)


class ZeroExtent:
    def __init__(self, sectors: int):
        self.length = sectors * SECTOR

    def read(self, offset: int, length: int, parent) -> bytes:
        return bytes(length)

    def status(self, offset: int) -> tuple[Status, int, int | None]:
        return Status.ZERO, self.length - offset, None

    def close(self) -> None:
        pass


class SparseExtent:
    """A hosted sparse extent; `stream` ones hold deflated grains behind markers."""

    def __init__(self, path: str, fd: int, header: SparseHeader, owns_fd: bool, writable: bool):
        self.path, self.fd, self.owns_fd = path, fd, owns_fd
        file_size = os.fstat(fd).st_size
        h = self.header = header
        if h.grain_size == 0 or h.grain_size & (h.grain_size - 1) or h.grain_size > 2048:
            raise CorruptImageError(path, 20, f"grain size {h.grain_size} sectors is invalid")
        if not 1 <= h.gtes_per_gt <= 1 << 16:
            raise CorruptImageError(path, 44, f"{h.gtes_per_gt} entries per grain table is invalid")
        self.stream = bool(h.flags & FLAG_MARKERS)
        self.compressed = bool(h.flags & FLAG_COMPRESSED)
        if h.gd_offset == GD_AT_END:
            if file_size < 3 * SECTOR:
                raise CorruptImageError(path, file_size, "streamOptimized file too short for its footer")
            footer = SparseHeader.unpack(path, os.pread(fd, SECTOR, file_size - 2 * SECTOR), file_size - 2 * SECTOR)
            h.gd_offset = footer.gd_offset
            if h.gd_offset == GD_AT_END:
                raise CorruptImageError(path, file_size - 2 * SECTOR, "footer has no grain directory offset")
        self.grain = h.grain_size * SECTOR
        self.length = h.capacity * SECTOR
        self.gt_coverage = h.gtes_per_gt * self.grain
        gd_entries = -(-self.length // self.gt_coverage)
        if gd_entries > MAX_GD_ENTRIES:
            raise CorruptImageError(path, 12, f"capacity of {h.capacity} sectors is too large")
        if h.gd_offset * SECTOR + gd_entries * 4 > file_size:
            raise CorruptImageError(path, h.gd_offset * SECTOR, "grain directory lies past the end of the file")
        self.gd = list(struct.unpack(f"<{gd_entries}I", pread_exact(fd, gd_entries * 4, h.gd_offset * SECTOR)))
        self.rgd = None
        if h.flags & FLAG_RGD and h.rgd_offset and not self.stream:
            self.rgd = list(struct.unpack(f"<{gd_entries}I", pread_exact(fd, gd_entries * 4, h.rgd_offset * SECTOR)))
        self.gts: dict[int, list[int]] = {}
        self._last: tuple[int, bytes] | None = None
        self.dirty_tables = False

    def _gt(self, index: int) -> list[int]:
        gt = self.gts.get(index)
        if gt is None:
            sector = self.gd[index]
            n = self.header.gtes_per_gt
            gt = self.gts[index] = (list(struct.unpack(f"<{n}I", pread_exact(self.fd, n * 4, sector * SECTOR)))
                                    if sector else [0] * n)
        return gt

    def _entry(self, grain: int) -> int:
        return self._gt(grain // self.header.gtes_per_gt)[grain % self.header.gtes_per_gt]

    def _grain_data(self, sector: int) -> bytes:
        if self._last and self._last[0] == sector:
            return self._last[1]
        if self.compressed:
            at = sector * SECTOR
            lba, size = struct.unpack("<QI", pread_exact(self.fd, 12, at))   # grain marker
            if size > 2 * self.grain + 1024:
                raise CorruptImageError(self.path, at, f"compressed grain of {size} bytes is too large")
            raw = pread_exact(self.fd, size, at + 12)
            try:
                data = zlib.decompress(raw)
            except zlib.error:
                raise CorruptImageError(self.path, at, "compressed grain does not inflate") from None
            if len(data) != self.grain:
                data = (data + bytes(self.grain))[:self.grain]
        else:
            data = pread_exact(self.fd, self.grain, sector * SECTOR)
        self._last = (sector, data)
        return data

    def read(self, offset: int, length: int, parent) -> bytes:
        parts = []
        pos, end = offset, offset + length
        while pos < end:
            grain, within = divmod(pos, self.grain)
            n = min(self.grain - within, end - pos)
            entry = self._entry(grain)
            if entry == 0:
                parts.append(parent(pos, n))
            elif entry == GTE_ZEROED:
                parts.append(bytes(n))
            elif self.compressed:
                parts.append(self._grain_data(entry)[within:within + n])
            else:
                parts.append(pread_exact(self.fd, n, entry * SECTOR + within))
            pos += n
        return b"".join(parts)

    def status(self, offset: int) -> tuple[Status, int, int | None]:
        grain, within = divmod(offset, self.grain)
        entry = self._entry(grain)
        n = self.grain - within
        if entry == 0:
            return Status.UNALLOCATED, n, None
        if entry == GTE_ZEROED:
            return Status.ZERO, n, None
        return Status.DATA, n, None if self.compressed else entry * SECTOR + within

    # writing

    def write_grain(self, grain: int, data: bytes, end_sector: int) -> int:
        """Stores one whole grain at end_sector (or in place); returns the new end."""
        index, slot = divmod(grain, self.header.gtes_per_gt)
        gt = self._gt(index)
        entry = gt[slot]
        if not self.compressed and entry > GTE_ZEROED:
            os.pwrite(self.fd, data, entry * SECTOR)
            return end_sector
        if self.compressed:
            packed = zlib.compress(data, 6)
            record = MARKER.pack(grain * self.header.grain_size, len(packed), 0)[:12] + packed
            record += bytes(-len(record) % SECTOR)
        else:
            record = data
        os.pwrite(self.fd, record, end_sector * SECTOR)
        gt[slot] = end_sector
        self._last = None
        new_end = end_sector + len(record) // SECTOR
        if self.stream:
            self.dirty_tables = True      # tables go to the end of the file on close
        else:
            self._store_entry(index, slot, end_sector)
        return new_end

    def _store_entry(self, index: int, slot: int, value: int) -> None:
        for gd in (self.gd, self.rgd):
            if gd is None:
                continue
            if not gd[index]:
                raise UnsupportedImageError(f"{self.path}: grain table {index} is not preallocated")
            os.pwrite(self.fd, struct.pack("<I", value), gd[index] * SECTOR + slot * 4)

    def close(self) -> None:
        if self.owns_fd:
            os.close(self.fd)


def write_stream_tail(ext: SparseExtent, end_sector: int) -> int:
    """Writes GTs, the GD, the footer and end-of-stream marker; returns the file end."""
    h, fd = ext.header, ext.fd
    gt_sectors = -(-h.gtes_per_gt * 4 // SECTOR)
    gd = [0] * len(ext.gd)
    for index in range(len(gd)):
        gt = ext._gt(index)
        if not any(gt):
            continue
        os.pwrite(fd, MARKER.pack(gt_sectors, 0, MARKER_GT) + bytes(SECTOR - MARKER.size), end_sector * SECTOR)
        gd[index] = end_sector + 1
        os.pwrite(fd, struct.pack(f"<{h.gtes_per_gt}I", *gt).ljust(gt_sectors * SECTOR, b"\0"),
                  (end_sector + 1) * SECTOR)
        end_sector += 1 + gt_sectors
    gd_sectors = -(-len(gd) * 4 // SECTOR)
    os.pwrite(fd, MARKER.pack(gd_sectors, 0, MARKER_GD) + bytes(SECTOR - MARKER.size), end_sector * SECTOR)
    gd_at = end_sector + 1
    os.pwrite(fd, struct.pack(f"<{len(gd)}I", *gd).ljust(gd_sectors * SECTOR, b"\0"), gd_at * SECTOR)
    end_sector = gd_at + gd_sectors
    footer = SparseHeader(**{**h.__dict__, "gd_offset": gd_at})
    os.pwrite(fd, MARKER.pack(1, 0, MARKER_FOOTER) + bytes(SECTOR - MARKER.size), end_sector * SECTOR)
    os.pwrite(fd, footer.pack(), (end_sector + 1) * SECTOR)
    os.pwrite(fd, bytes(SECTOR), (end_sector + 2) * SECTOR)
    end_sector += 3
    os.ftruncate(fd, end_sector * SECTOR)
    ext.gd = gd
    ext.dirty_tables = False
    return end_sector


# ---- the image ----------------------------------------------------------

WRITABLE = ("monolithicSparse", "streamOptimized")


class VmdkImage(ImageBase):
    format = "vmdk"

    def __init__(self, path: str, readonly: bool = False, seen: tuple[str, ...] = ()):
        self.path = path
        self.readonly = readonly
        self.extents: list = []
        self.backing = None
        try:
            self._open(seen)
        except BaseException:
            for e in self.extents:
                e.close()
            raise

    def _open(self, seen: tuple[str, ...]) -> None:
        mode = os.O_RDONLY if self.readonly else os.O_RDWR
        try:
            fd = os.open(self.path, mode)
        except OSError as e:
            raise ImageError(f"{self.path}: {e.strerror}") from None
        head = pread_exact(fd, SECTOR, 0)
        own_header = None
        if head[:4] == MAGIC:
            own_header = SparseHeader.unpack(self.path, head)
            if own_header.version not in (1, 2, 3):
                os.close(fd)
                raise UnsupportedImageError(f"{self.path}: VMDK sparse version {own_header.version} is not supported")
            if not own_header.descriptor_offset:
                os.close(fd)
                raise CorruptImageError(self.path, 28, "sparse extent has no embedded descriptor")
            if own_header.descriptor_size > 2048:
                os.close(fd)
                raise CorruptImageError(self.path, 36, "embedded descriptor too large")
            text = pread_exact(fd, own_header.descriptor_size * SECTOR, own_header.descriptor_offset * SECTOR)
        elif head[:4] == b"COWD":
            os.close(fd)
            raise UnsupportedImageError(f"{self.path}: VMDK version 3 (COWD) extents are not supported")
        else:
            size = os.fstat(fd).st_size
            if size > 1 << 20:
                os.close(fd)
                raise CorruptImageError(self.path, 0, "not a VMDK (no sparse magic, too big for a descriptor)")
            text = pread_exact(fd, size, 0)
            os.close(fd)
            fd = None
        self.descriptor = parse_descriptor(self.path, text.decode("utf-8", "replace"))
        self.subformat = self.descriptor.create_type
        if not self.readonly and self.subformat not in WRITABLE:
            if fd is not None:
                os.close(fd)
            raise UnsupportedImageError(f"{self.path}: VMDK {self.subformat or 'images'} are read-only in pyvmm")
        directory = os.path.dirname(os.path.abspath(self.path))
        used_own = False
        for access, sectors, kind, name, offset in self.descriptor.extents:
            if kind == "ZERO":
                self.extents.append(ZeroExtent(sectors))
            elif kind in ("FLAT", "VMFS"):
                self.extents.append(FlatExtent(os.path.join(directory, name or ""), sectors, offset, self.readonly))
            elif kind in ("SPARSE", "VMFSSPARSE"):
                if own_header is not None and not used_own:
                    extent = SparseExtent(self.path, fd, own_header, True, not self.readonly)
                    used_own = True
                else:
                    extent = _open_sparse_file(os.path.join(directory, name or ""), self.readonly)
                if extent.length < sectors * SECTOR:
                    raise CorruptImageError(extent.path, 12, "sparse extent smaller than its descriptor line")
                extent.length = sectors * SECTOR
                self.extents.append(extent)
        if fd is not None and not used_own:
            os.close(fd)
        self.starts = []
        total = 0
        for e in self.extents:
            self.starts.append(total)
            total += e.length
        self.size = total
        hint = self.descriptor.fields.get("parentFileNameHint")
        self.backing_name = hint
        if hint:
            self.backing = open_backing(self.path, hint, None, seen)
        self._end_sector = 0
        if not self.readonly:
            self._prepare_writes()

    def _prepare_writes(self) -> None:
        ext = self.extents[0]
        if len(self.extents) != 1 or not isinstance(ext, SparseExtent):
            raise UnsupportedImageError(f"{self.path}: only single-extent sparse VMDKs are writable")
        file_sectors = -(-os.fstat(ext.fd).st_size // SECTOR)
        if ext.stream:
            for index in range(len(ext.gd)):   # the tables at the end are about to be overwritten
                ext._gt(index)
            tail = [s - 1 for s in (ext.header.gd_offset, *ext.gd) if s and s - 1 >= ext.header.overhead]
            self._end_sector = min(tail) if tail else file_sectors
            header = SparseHeader(**{**ext.header.__dict__, "gd_offset": GD_AT_END})
            os.pwrite(ext.fd, header.pack(), 0)
            ext.dirty_tables = True
        else:
            self._end_sector = -(-file_sectors // ext.header.grain_size) * ext.header.grain_size

    @staticmethod
    def _parent_reader(image, base: int):
        def read(offset: int, length: int) -> bytes:
            return read_from_backing(image.backing, base + offset, length)
        return read

    def _locate(self, offset: int) -> int:
        index = 0
        while index + 1 < len(self.starts) and self.starts[index + 1] <= offset:
            index += 1
        return index

    def read(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length)
        parts = []
        pos, end = offset, offset + length
        while pos < end:
            i = self._locate(pos)
            ext, start = self.extents[i], self.starts[i]
            n = min(ext.length - (pos - start), end - pos)
            parts.append(ext.read(pos - start, n, self._parent_reader(self, start)))
            pos += n
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        self._check_write(offset, len(data))
        ext: SparseExtent = self.extents[0]
        grain = ext.grain
        pos, done = offset, 0
        view = memoryview(data)
        while done < len(data):
            g, within = divmod(pos, grain)
            n = min(grain - within, len(data) - done)
            chunk = view[done:done + n]
            entry = ext._entry(g)
            if not ext.compressed and entry > GTE_ZEROED:
                os.pwrite(ext.fd, chunk, entry * SECTOR + within)
            else:
                if n == grain:
                    content = bytes(chunk)
                else:
                    old = bytearray(ext.read(g * grain, grain, self._parent_reader(self, 0)))
                    old[within:within + n] = chunk
                    content = bytes(old)
                if ext.stream and not any(content) and self.backing is None:
                    ext._gt(g // ext.header.gtes_per_gt)[g % ext.header.gtes_per_gt] = 0
                    ext.dirty_tables = True
                else:
                    self._end_sector = ext.write_grain(g, content, self._end_sector)
                    if not ext.stream:   # keep grains grain-aligned in hosted sparse files
                        gs = ext.header.grain_size
                        self._end_sector = -(-self._end_sector // gs) * gs
            pos += n
            done += n

    def flush(self) -> None:
        if self.readonly:
            return
        ext = self.extents[0]
        if ext.stream and ext.dirty_tables:
            write_stream_tail(ext, self._end_sector)
        os.fsync(ext.fd)

    def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)   # grains cannot be freed in a hosted sparse file

    def block_status(self, offset: int, length: int) -> Iterator[Extent]:
        pos, end = offset, offset + length
        current: Extent | None = None
        while pos < end:
            i = self._locate(pos)
            status, n, host = self.extents[i].status(pos - self.starts[i])
            n = min(n, end - pos)
            compressed = status == Status.DATA and host is None
            if (current and current.status == status and current.compressed == compressed
                    and (host is None) == (current.host_offset is None)
                    and (host is None or current.host_offset + current.length == host)):
                current.length += n
            else:
                if current:
                    yield current
                current = Extent(pos, n, status, host, compressed)
            pos += n
        if current:
            yield current

    def make_empty(self) -> None:
        ext = self.extents[0]
        for index in range(len(ext.gd)):
            gt = ext._gt(index)
            for slot in range(len(gt)):
                if gt[slot]:
                    gt[slot] = 0
                    if not ext.stream:
                        ext._store_entry(index, slot, 0)
        ext.dirty_tables = ext.stream

    def info(self) -> dict:
        return {"create-type": self.subformat, "cid": int(self.descriptor.fields.get("CID", "0"), 16),
                "parent-cid": int(self.descriptor.fields.get("parentCID", "ffffffff"), 16),
                "extents": [{"filename": getattr(e, "path", ""), "virtual-size": e.length,
                             "compressed": bool(getattr(e, "compressed", False))} for e in self.extents]}

    def check(self):
        """Grain and table offsets must lie inside their files."""
        result = CheckResult(self.path, format="vmdk")
        for ext in self.extents:
            if not isinstance(ext, SparseExtent):
                continue
            file_sectors = -(-os.fstat(ext.fd).st_size // SECTOR)
            for index in range(len(ext.gd)):
                if ext.gd[index] >= file_sectors:
                    result.corruptions += 1
                    result.messages.append(f"ERROR grain table {index} at sector {ext.gd[index]} past the end")
                    continue
                for entry in ext._gt(index):
                    if entry > GTE_ZEROED:
                        result.allocated_clusters += 1
                        if entry >= file_sectors:
                            result.corruptions += 1
                            result.messages.append(f"ERROR grain at sector {entry} past the end of the file")
            result.total_clusters += -(-ext.length // ext.grain)
            result.image_end_offset = os.fstat(ext.fd).st_size
        return result

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.flush()
        finally:
            for e in self.extents:
                e.close()
            if self.backing is not None:
                self.backing.close()


def _open_sparse_file(path: str, readonly: bool) -> SparseExtent:
    try:
        fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}") from None
    try:
        header = SparseHeader.unpack(path, pread_exact(fd, SECTOR, 0))
        return SparseExtent(path, fd, header, True, not readonly)
    except BaseException:
        os.close(fd)
        raise


def create_vmdk(path: str, size: int, *, subformat: str = "monolithicSparse", backing: str | None = None,
                adapter_type: str = "ide") -> None:
    """Creates an empty monolithicSparse, streamOptimized or monolithicFlat
    VMDK; `backing` (a VMDK) becomes its parent. Raises ImageError."""
    if subformat not in ("monolithicSparse", "streamOptimized", "monolithicFlat"):
        raise ImageError(f"VMDK subformat {subformat!r}: pyvmm creates monolithicSparse, streamOptimized, "
                         "monolithicFlat")
    if adapter_type not in ("ide", "buslogic", "lsilogic", "legacyESX"):
        raise ImageError(f"bad adapter_type {adapter_type!r}")
    sectors = -(-size // SECTOR)
    cid = random.getrandbits(32) or 1
    parent_cid, hint = 0xFFFFFFFF, None
    if backing:
        with VmdkImage(backing if os.path.isabs(backing) else
                       os.path.join(os.path.dirname(os.path.abspath(path)), backing), readonly=True) as parent:
            parent_cid = int(parent.descriptor.fields.get("CID", "ffffffff"), 16)
            if parent.size < sectors * SECTOR:
                sectors = parent.size // SECTOR
        hint = backing
    name = os.path.basename(path)
    if subformat == "monolithicFlat":
        flat = name[:-5] + "-flat.vmdk" if name.endswith(".vmdk") else name + "-flat"
        text = format_descriptor(subformat, [f'RW {sectors} FLAT "{flat}" 0'], cid=cid, parent_cid=parent_cid,
                                 parent_hint=hint, sectors=sectors, adapter=adapter_type)
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), flat), "wb") as f:
            f.truncate(sectors * SECTOR)
        with open(path, "w") as f:
            f.write(text)
        return
    stream = subformat == "streamOptimized"
    text = format_descriptor(subformat, [f'RW {sectors} SPARSE "{name}"'], cid=cid, parent_cid=parent_cid,
                             parent_hint=hint, sectors=sectors, adapter=adapter_type).encode()
    if len(text) > DESCRIPTOR_SECTORS * SECTOR:
        raise ImageError("VMDK descriptor too long (backing file name?)")
    gd_entries = -(-sectors // (GRAIN_SECTORS * GTES_PER_GT))
    gd_sectors = -(-gd_entries * 4 // SECTOR)
    gt_sectors = GTES_PER_GT * 4 // SECTOR
    rgd = 1 + DESCRIPTOR_SECTORS
    gd = rgd + gd_sectors + gd_entries * gt_sectors
    end = gd + gd_sectors + gd_entries * gt_sectors
    overhead = -(-end // GRAIN_SECTORS) * GRAIN_SECTORS
    flags = FLAG_NL_DETECT | (FLAG_COMPRESSED | FLAG_MARKERS if stream else FLAG_RGD)
    header = SparseHeader(3 if stream else 1, flags, sectors, GRAIN_SECTORS, 1, DESCRIPTOR_SECTORS, GTES_PER_GT,
                          0 if stream else rgd, GD_AT_END if stream else gd, GRAIN_SECTORS if stream else overhead,
                          compress=COMPRESS_DEFLATE if stream else 0)
    with open(path, "wb") as f:
        f.write(header.pack())
        f.write(text.ljust(DESCRIPTOR_SECTORS * SECTOR, b"\0"))
        if stream:
            f.truncate(GRAIN_SECTORS * SECTOR)
        else:
            for table_at in (rgd, gd):
                gts = [table_at + gd_sectors + i * gt_sectors for i in range(gd_entries)]
                f.seek(table_at * SECTOR)
                f.write(struct.pack(f"<{gd_entries}I", *gts))
            f.truncate(overhead * SECTOR)
    if stream:   # the grain directory and footer of an empty stream
        fd = os.open(path, os.O_RDWR)
        try:
            ext = SparseExtent.__new__(SparseExtent)
            ext.fd, ext.header, ext.gd, ext.gts = fd, header, [0] * gd_entries, {}
            write_stream_tail(ext, GRAIN_SECTORS)
        finally:
            os.close(fd)
