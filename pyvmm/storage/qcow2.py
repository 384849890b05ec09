"""qcow2 images: version 3 read/write, version 2 read.

Guest cluster -> L1 entry -> L2 table -> host cluster. Crash safety comes
from the order of writes, each one a pwrite that a SIGKILL cannot undo:
a new cluster's data goes first, then its refcount, then the L2 entry that
points at it (a new L2 table likewise: its contents, its refcount, then the
L1 entry, before any data cluster is put in it). Freeing runs the
other way round: drop the reference, then the refcount. So a kill at any
moment leaves at worst a cluster whose refcount is higher than its
references, which `qemu-img check` calls a leak, never corruption.
Metadata is write-through (cached for reads only); flush() is fsync.
There is no fsync between the steps: the order holds against a killed
process (the kernel keeps every write that returned), not against power
loss, where the disk may reorder writes made since the last flush().
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from typing import Iterator

from .image import (CorruptImageError, Extent, ImageBase, ImageError, Status, UnsupportedImageError,
                    check_range, open_backing, pread_exact, read_from_backing)
from .qcow2_layout import (COMPRESSED, DATA, UNALLOCATED, ZERO,  # noqa: F401 (re-exported)
                           COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, L1_FIELDS,
                           L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFF_INCOMPAT, OFF_L1, OFF_REFTABLE, OFF_SIZE,
                           OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, REFT_OFFSET_MASK, REFTABLE_FIELDS,
                           U64, compressed_entry, compressed_geometry, parse_header)

# Parsed L2 tables and refcount blocks kept, counted in entries (8 bytes
# each as arrays): 32 MiB, whatever the cluster size. Write-through, so
# dropping the cache costs only re-reads.
CACHE_ENTRIES = 4 << 20

# Kinds of guest cluster.


class Qcow2Image(ImageBase):
    format = "qcow2"

    def __init__(self, path: str, readonly: bool = False, seen: tuple[str, ...] = ()):
        self.path = path
        self.readonly = readonly
        self.needs_recount = False
        try:
            self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as e:
            raise ImageError(f"{path}: {e.strerror}") from None
        self.backing = None
        try:
            self._open(seen)
        except BaseException:
            os.close(self.fd)
            if self.backing is not None:
                self.backing.close()
            raise

    def _open(self, seen: tuple[str, ...]) -> None:
        file_size = os.fstat(self.fd).st_size
        h = self.header = parse_header(self.path, os.pread(self.fd, 1 << 21, 0), file_size)
        if not self.readonly:
            if h.version < 3:
                raise UnsupportedImageError(f"{self.path}: qcow2 version 2 images are read-only in pyvmm")
            if h.refcount_order < 3:
                raise UnsupportedImageError(f"{self.path}: pyvmm writes only images with refcounts of 8 bits "
                                            "or more (convert it, or open it read-only)")
            if h.incompatible & INCOMPAT_CORRUPT:
                raise ImageError(f"{self.path}: image is marked corrupt; open it read-only or run "
                                 "`pyvmm img check -r all`")
        self.size = h.size
        self.cluster_bits = h.cluster_bits
        self.cluster_size = cs = h.cluster_size
        self.l2_bits = h.cluster_bits - 3
        self.l2_entries = 1 << self.l2_bits
        self.refcount_bits = 1 << h.refcount_order
        self.refcount_width = max(1, self.refcount_bits // 8)   # bytes per refcount, when writable
        self.refcount_max = (1 << self.refcount_bits) - 1
        self.rb_entries = cs * 8 // self.refcount_bits
        self._rb_fmt = {8: "B", 16: "H", 32: "I", 64: "Q"}.get(self.refcount_bits)
        self.l1 = self._read_table(h.l1_table_offset, h.l1_size)
        self.reftable = [e & REFT_OFFSET_MASK for e in
                         self._read_table(h.refcount_table_offset, h.refcount_table_clusters * cs // 8)]
        self.reftable_capacity = len(self.reftable)
        self._reftable_pending = False
        self._l2_cache: dict[int, array] = {}
        self._rb_cache: dict[int, array | list[int]] = {}
        self._end_cluster = -(-file_size // cs)
        self._free_hint = self._end_cluster
        self._last_compressed: tuple[int, bytes] | None = None
        self.compress_writes = False
        self._compressed_tail = 0     # host byte where the next compressed cluster may start
        self.backing = None
        self.backing_name = h.backing_file    # as stored: maybe relative to this image
        if h.backing_file:
            self.backing = open_backing(self.path, h.backing_file, h.backing_format, seen)
        if not self.readonly:
            stale = h.incompatible & INCOMPAT_DIRTY and h.compatible & COMPAT_LAZY_REFCOUNTS
            self._set_incompatible(h.incompatible | INCOMPAT_DIRTY)
            # qemu with lazy refcounts stopped without updating them: the
            # opener (formats.py) recounts before anything is written
            self.needs_recount = bool(stale)

    # ---- tables -------------------------------------------------------

    def _read_table(self, offset: int, count: int) -> list[int]:
        return list(struct.unpack(f">{count}Q", pread_exact(self.fd, count * 8, offset))) if count else []

    def _load_l2(self, offset: int) -> array:
        table = self._l2_cache.get(offset)
        if table is None:
            if offset % self.cluster_size:
                raise CorruptImageError(self.path, offset, "L2 table not cluster aligned")
            if len(self._l2_cache) * self.l2_entries >= CACHE_ENTRIES:
                self._l2_cache.clear()
            table = self._l2_cache[offset] = _big_endian_array("Q", pread_exact(self.fd, self.cluster_size, offset))
        return table

    def _load_refblock(self, offset: int) -> "array | list[int]":
        block = self._rb_cache.get(offset)
        if block is None:
            if offset % self.cluster_size:
                raise CorruptImageError(self.path, offset, "refcount block not cluster aligned")
            if len(self._rb_cache) * self.rb_entries >= CACHE_ENTRIES:
                self._rb_cache.clear()
            raw = pread_exact(self.fd, self.cluster_size, offset)
            if self._rb_fmt:
                block = _big_endian_array(self._rb_fmt, raw)
            else:   # 1, 2 or 4 bits: packed from the least significant bit of each byte up
                bits, per_byte = self.refcount_bits, 8 // self.refcount_bits
                block = [(raw[i // per_byte] >> (bits * (i % per_byte))) & self.refcount_max
                         for i in range(self.rb_entries)]
            self._rb_cache[offset] = block
        return block

    def _set_incompatible(self, bits: int) -> None:
        self.header.incompatible = bits
        os.pwrite(self.fd, U64.pack(bits), OFF_INCOMPAT)
        os.fsync(self.fd)

    # ---- guest cluster lookup -----------------------------------------

    def _entry(self, cluster: int) -> int:
        l1i = cluster >> self.l2_bits
        l2_offset = self.l1[l1i] & L1E_OFFSET_MASK if l1i < len(self.l1) else 0
        if not l2_offset:
            return 0
        return self._load_l2(l2_offset)[cluster & (self.l2_entries - 1)]

    def classify(self, entry: int) -> tuple[str, int]:
        """(kind, host offset) of an L2 entry."""
        if entry & OFLAG_COMPRESSED:
            return COMPRESSED, compressed_geometry(entry, self.cluster_bits)[0]
        host = entry & L2E_OFFSET_MASK
        if entry & OFLAG_ZERO and self.header.version >= 3:
            return ZERO, host
        if host:
            if host % self.cluster_size:
                raise CorruptImageError(self.path, host, "data cluster not cluster aligned")
            return DATA, host
        return UNALLOCATED, 0

    def _decompress(self, entry: int) -> bytes:
        host, nbytes = compressed_geometry(entry, self.cluster_bits)
        if self._last_compressed and self._last_compressed[0] == entry:
            return self._last_compressed[1]
        raw = pread_exact(self.fd, nbytes, host)
        try:
            data = zlib.decompressobj(-15).decompress(raw, self.cluster_size)
        except zlib.error:
            raise CorruptImageError(self.path, host, "compressed cluster does not inflate") from None
        if len(data) != self.cluster_size:
            raise CorruptImageError(self.path, host, "compressed cluster inflates to the wrong size")
        self._last_compressed = (entry, data)
        return data

    def _cluster_bytes(self, cluster: int, entry: int, within: int, length: int) -> bytes:
        kind, host = self.classify(entry)
        if kind == DATA:
            return pread_exact(self.fd, length, host + within)
        if kind == COMPRESSED:
            return self._decompress(entry)[within:within + length]
        if kind == ZERO:
            return bytes(length)
        return read_from_backing(self.backing, (cluster << self.cluster_bits) + within, length)

    # ---- DiskImage ----------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length)
        cs, bits = self.cluster_size, self.cluster_bits
        parts = []
        pos, end = offset, offset + length
        while pos < end:
            cluster, within = pos >> bits, pos & (cs - 1)
            entry = self._entry(cluster)
            n = min(cs - within, end - pos)
            kind, host = self.classify(entry)
            if kind == DATA:   # merge a run of host-contiguous clusters into one pread
                k = 1
                while pos + n < end:
                    nk, nh = self.classify(self._entry(cluster + k))
                    if nk != DATA or nh != host + k * cs:
                        break
                    n += min(cs, end - pos - n)
                    k += 1
                parts.append(pread_exact(self.fd, n, host + within))
            else:
                parts.append(self._cluster_bytes(cluster, entry, within, n))
            pos += n
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        self._check_write(offset, len(data))
        cs, bits = self.cluster_size, self.cluster_bits
        view = memoryview(data)
        pos, done = offset, 0
        while done < len(data):
            cluster, within = pos >> bits, pos & (cs - 1)
            n = min(cs - within, len(data) - done)
            self._write_cluster(cluster, within, view[done:done + n])
            pos += n
            done += n

    def _write_cluster(self, cluster: int, within: int, chunk: memoryview) -> None:
        cs = self.cluster_size
        l2_offset, table = self._l2_for_write(cluster >> self.l2_bits)
        index = cluster & (self.l2_entries - 1)
        entry = table[index]
        kind, host = self.classify(entry)
        if kind == DATA and entry & OFLAG_COPIED:
            os.pwrite(self.fd, chunk, host + within)
            return
        if len(chunk) == cs:
            content = bytes(chunk)
        else:
            old = bytearray(self._cluster_bytes(cluster, entry, 0, cs))
            old[within:within + len(chunk)] = chunk
            content = bytes(old)
        if kind == ZERO and host and entry & OFLAG_COPIED:
            os.pwrite(self.fd, content, host)      # preallocated zero cluster: fill in place
            self._set_l2(l2_offset, table, index, host | OFLAG_COPIED)
            return
        if self.compress_writes and kind == UNALLOCATED and len(chunk) == cs:
            if self._write_compressed(l2_offset, table, index, content):
                return
        new = self._reserve_cluster()
        os.pwrite(self.fd, content, new * cs)
        self._set_refcount(new, 1)
        self._set_l2(l2_offset, table, index, (new * cs) | OFLAG_COPIED)
        self._release(entry)

    def _set_l2(self, l2_offset: int, table: array, index: int, entry: int) -> None:
        table[index] = entry
        os.pwrite(self.fd, U64.pack(entry), l2_offset + index * 8)

    def _l2_for_write(self, l1i: int) -> tuple[int, array]:
        """The L2 table for l1i, allocated or copied (if shared) so it can be written."""
        if l1i >= len(self.l1):
            raise CorruptImageError(self.path, self.header.l1_table_offset, "L1 table shorter than the disk")
        entry = self.l1[l1i]
        old = entry & L1E_OFFSET_MASK
        if old and entry & OFLAG_COPIED:
            return old, self._load_l2(old)
        table = array("Q", self._load_l2(old)) if old else array("Q", bytes(self.cluster_size))
        new = self._reserve_cluster()
        os.pwrite(self.fd, _big_endian_bytes(table), new * self.cluster_size)
        self._set_refcount(new, 1)
        self._l2_cache[new * self.cluster_size] = table
        self._set_l1(l1i, (new * self.cluster_size) | OFLAG_COPIED)
        if old:
            self._change_refcount(old // self.cluster_size, -1)
        return new * self.cluster_size, table

    def _set_l1(self, l1i: int, entry: int) -> None:
        self.l1[l1i] = entry
        os.pwrite(self.fd, U64.pack(entry), self.header.l1_table_offset + l1i * 8)

    def _release(self, entry: int) -> None:
        """Drops one reference held by a replaced L2 entry."""
        kind, host = self.classify(entry)
        if kind == COMPRESSED:
            host, nbytes = compressed_geometry(entry, self.cluster_bits)
            for c in range(host >> self.cluster_bits, ((host + nbytes - 1) >> self.cluster_bits) + 1):
                self._change_refcount(c, -1)
        elif host:
            self._change_refcount(host >> self.cluster_bits, -1)

    def _write_compressed(self, l2_offset: int, table: array, index: int, content: bytes) -> bool:
        """Packs a deflated cluster after the previous one, as qemu does; False if it does not shrink."""
        if not any(content) and self.backing is None:
            return True      # an unallocated cluster already reads as zeros (no backing when converting)
        comp = zlib.compressobj(6, zlib.DEFLATED, -12)
        packed = comp.compress(content) + comp.flush()
        if len(packed) >= self.cluster_size - 512:
            return False
        cs = self.cluster_size
        host = self._compressed_tail
        if host % cs and (host + len(packed) - 1) // cs == host // cs:
            os.pwrite(self.fd, packed, host)           # shares the cluster the previous one ends in
            self._change_refcount(host // cs, +1)
        else:
            cluster = self._alloc_run(1)
            host = cluster * cs
            os.pwrite(self.fd, packed, host)
            self._set_refcount(cluster, 1)
        self._compressed_tail = host + len(packed)
        self._set_l2(l2_offset, table, index, compressed_entry(host, len(packed), self.cluster_bits))
        return True

    def flush(self) -> None:
        if not self.readonly:
            os.fsync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Frees whole clusters in the range (with a backing file they turn
        into zero clusters, so the backing data does not show through)."""
        self._check_write(offset, length)
        self._drop_clusters(offset, length, zero=self.backing is not None)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        cs = self.cluster_size
        first = -(-offset // cs) * cs
        last = ((offset + length) // cs) * cs
        if first >= last:
            return ImageBase.write_zeroes(self, offset, length)
        if first > offset:
            ImageBase.write_zeroes(self, offset, first - offset)
        self._drop_clusters(first, last - first, zero=True)
        if offset + length > last:
            ImageBase.write_zeroes(self, last, offset + length - last)

    def _drop_clusters(self, offset: int, length: int, zero: bool) -> None:
        cs = self.cluster_size
        for cluster in range(-(-offset // cs), (offset + length) // cs):
            entry = self._entry(cluster)
            kind, _ = self.classify(entry)
            if kind == UNALLOCATED and self.backing is None:
                continue
            if kind == ZERO and not (entry & L2E_OFFSET_MASK):
                continue
            l2_offset, table = self._l2_for_write(cluster >> self.l2_bits)
            self._set_l2(l2_offset, table, cluster & (self.l2_entries - 1), OFLAG_ZERO if zero else 0)
            self._release(entry)

    def block_status(self, offset: int, length: int) -> Iterator[Extent]:
        cs = self.cluster_size
        pos, end = offset, offset + length
        current: Extent | None = None
        while pos < end:
            cluster, within = pos >> self.cluster_bits, pos & (cs - 1)
            n = min(cs - within, end - pos)
            entry = self._entry(cluster)
            kind, host = self.classify(entry)
            status = {DATA: Status.DATA, COMPRESSED: Status.DATA, ZERO: Status.ZERO}.get(kind, Status.UNALLOCATED)
            host_at = host + within if kind == DATA else None
            if (current and current.status == status and current.compressed == (kind == COMPRESSED)
                    and (host_at is None) == (current.host_offset is None)
                    and (host_at is None or current.host_offset + current.length == host_at)):
                current.length += n
            else:
                if current:
                    yield current
                current = Extent(pos, n, status, host_at, kind == COMPRESSED)
            pos += n
        if current:
            yield current

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if not self.readonly:
                os.fsync(self.fd)
                # Not synced: if this write is lost the image merely stays dirty.
                self.header.incompatible &= ~INCOMPAT_DIRTY
                os.pwrite(self.fd, U64.pack(self.header.incompatible), OFF_INCOMPAT)
        finally:
            os.close(self.fd)
            if self.backing is not None:
                self.backing.close()

    # ---- refcounts and allocation --------------------------------------

    def get_refcount(self, cluster: int) -> int:
        group, index = divmod(cluster, self.rb_entries)
        if group >= len(self.reftable) or not self.reftable[group]:
            return 0
        return self._load_refblock(self.reftable[group])[index]

    def _change_refcount(self, cluster: int, delta: int) -> None:
        value = self.get_refcount(cluster) + delta
        if value < 0:
            raise CorruptImageError(self.path, cluster * self.cluster_size, "refcount would drop below zero")
        if value > self.refcount_max:
            raise CorruptImageError(self.path, cluster * self.cluster_size,
                                    f"refcount overflow (more than {self.refcount_max})")
        self._set_refcount(cluster, value)

    def _set_refcount(self, cluster: int, value: int) -> None:
        group, index = divmod(cluster, self.rb_entries)
        if group >= len(self.reftable):
            self.reftable.extend([0] * (group + 1 - len(self.reftable)))
        block_offset = self.reftable[group]
        if not block_offset:
            if value == 0:
                return
            block_offset = self._new_refblock(group)
        block = self._load_refblock(block_offset)
        block[index] = value
        os.pwrite(self.fd, value.to_bytes(self.refcount_width, "big"),
                  block_offset + index * self.refcount_width)
        if value == 0 and cluster < self._free_hint:
            self._free_hint = cluster
        self._after_alloc()

    def _new_refblock(self, group: int) -> int:
        """A zeroed refcount block for `group`, at the end of the file. If it
        falls inside its own group it counts itself; otherwise its own
        refcount is set first, so no moment has it referenced but uncounted."""
        cs = self.cluster_size
        cluster = self._end_cluster
        self._end_cluster += 1
        block = array(self._rb_fmt, bytes(cs))
        if cluster // self.rb_entries == group:
            block[cluster % self.rb_entries] = 1
        else:
            self._set_refcount(cluster, 1)
        os.pwrite(self.fd, _big_endian_bytes(block), cluster * cs)
        self._rb_cache[cluster * cs] = block
        self.reftable[group] = cluster * cs
        if group < self.reftable_capacity:
            os.pwrite(self.fd, U64.pack(cluster * cs), self.header.refcount_table_offset + group * 8)
        else:
            self._reftable_pending = True
        return cluster * cs

    def _after_alloc(self) -> None:
        if self._reftable_pending and not getattr(self, "_growing", False):
            self._grow_reftable()

    def _grow_reftable(self) -> None:
        """Writes a bigger refcount table at the end of the file, switches the
        header to it in one 12-byte pwrite, then frees the old one."""
        self._growing = True
        try:
            cs = self.cluster_size
            entries = 2 * len(self.reftable) + 8
            clusters = -(-entries * 8 // cs)
            first = self._alloc_run(clusters)
            for c in range(first, first + clusters):
                self._set_refcount(c, 1)
            if len(self.reftable) > clusters * cs // 8:
                raise ImageError(f"{self.path}: refcount table growth did not converge")
            table = self.reftable + [0] * (clusters * cs // 8 - len(self.reftable))
            os.pwrite(self.fd, struct.pack(f">{len(table)}Q", *table), first * cs)
            old_offset, old_clusters = self.header.refcount_table_offset, self.header.refcount_table_clusters
            os.pwrite(self.fd, REFTABLE_FIELDS.pack(first * cs, clusters), OFF_REFTABLE)
            self.header.refcount_table_offset, self.header.refcount_table_clusters = first * cs, clusters
            self.reftable = table
            self.reftable_capacity = len(table)
            self._reftable_pending = False
            for c in range(old_offset // cs, old_offset // cs + old_clusters):
                self._change_refcount(c, -1)
        finally:
            self._growing = False

    def _reserve_cluster(self) -> int:
        """A free cluster index; the caller writes it, then sets its refcount."""
        while self._free_hint < self._end_cluster:
            cluster = self._free_hint
            self._free_hint += 1
            if cluster and self.get_refcount(cluster) == 0:
                return cluster
        return self._alloc_run(1)

    def _alloc_run(self, count: int) -> int:
        """`count` contiguous clusters at the end of the file (refcounts left to the caller)."""
        first = self._end_cluster
        self._end_cluster += count
        if self._free_hint == first:
            self._free_hint = self._end_cluster
        return first

    # ---- whole-image operations ---------------------------------------

    def grow_l1(self, entries: int) -> None:
        """Makes the active L1 table at least `entries` long: the new table is
        written before the header points at it, and the old one is freed after."""
        if entries <= len(self.l1):
            return
        cs = self.cluster_size
        clusters = -(-entries * 8 // cs)
        first = self._alloc_run(clusters)
        table = self.l1 + [0] * (clusters * cs // 8 - len(self.l1))
        os.pwrite(self.fd, struct.pack(f">{len(table)}Q", *table), first * cs)
        for c in range(first, first + clusters):
            self._set_refcount(c, 1)
        old_offset, old_size = self.header.l1_table_offset, len(self.l1)
        os.pwrite(self.fd, L1_FIELDS.pack(len(table), first * cs), OFF_L1)
        self.header.l1_size, self.header.l1_table_offset = len(table), first * cs
        self.l1 = table
        for c in range(old_offset // cs, -(-(old_offset + old_size * 8) // cs)):
            self._change_refcount(c, -1)

    def resize(self, size: int) -> None:
        """Grows the disk (a bigger L1 table is written before the header
        points at it). Shrinking is refused. Raises ImageError."""
        if self.readonly:
            raise ImageError(f"{self.path}: image is open read-only")
        if size < self.size:
            raise ImageError(f"{self.path}: shrinking a qcow2 image is not supported")
        cs = self.cluster_size
        self.grow_l1(-(-size // (cs * self.l2_entries)))
        os.pwrite(self.fd, U64.pack(size), OFF_SIZE)
        self.header.size = self.size = size
        os.fsync(self.fd)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def info(self) -> dict:
        h = self.header
        return {"compat": "1.1" if h.version >= 3 else "0.10",
                "lazy-refcounts": bool(h.compatible & COMPAT_LAZY_REFCOUNTS),
                "refcount-bits": self.refcount_bits,
                "corrupt": bool(h.incompatible & INCOMPAT_CORRUPT),
                "dirty": bool(h.incompatible & INCOMPAT_DIRTY)}


def _big_endian_array(typecode: str, raw: bytes) -> array:
    """A table of big-endian integers as a native array (8x smaller than a list)."""
    table = array(typecode, raw)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def _big_endian_bytes(table: array) -> bytes:
    if sys.byteorder == "little":
        table = array(table.typecode, table)
        table.byteswap()
    return table.tobytes()
