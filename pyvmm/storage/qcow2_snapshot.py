"""Internal qcow2 snapshots: the snapshot table, and create / apply /
delete / list on an open Qcow2Image.

A snapshot is a copy of the L1 table. Refcounts count paths: a data
cluster reached from the active L1 and from one snapshot's L1 through the
same L2 table has refcount 2. A cluster with refcount above 1 loses its
COPIED flag, so the next guest write to it copies it first.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass

from .image import CorruptImageError, ImageBase, ImageError
from .qcow2_layout import (COMPRESSED, UNALLOCATED, L1E_OFFSET_MASK, OFF_SIZE, OFF_SNAPSHOTS, OFLAG_COPIED,
                           SNAPSHOT_ENTRY, SNAPSHOT_EXTRA, SNAPSHOT_FIELDS, U64, compressed_geometry)


@dataclass
class Snapshot:
    id: str
    name: str
    l1_offset: int
    l1_size: int
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int = 0
    extra: bytes = b""

    def as_json(self) -> dict:
        return {"id": self.id, "name": self.name, "vm-state-size": self.vm_state_size,
                "date-sec": self.date_sec, "date-nsec": self.date_nsec,
                "vm-clock-sec": self.vm_clock_nsec // 10**9, "vm-clock-nsec": self.vm_clock_nsec % 10**9}


def read_snapshots(img: ImageBase) -> list[Snapshot]:
    """The snapshot table. Raises CorruptImageError naming the bad entry's offset."""
    h = img.header
    file_size = os.fstat(img.fd).st_size
    snaps, pos = [], h.snapshots_offset
    for _ in range(h.nb_snapshots):
        raw = os.pread(img.fd, SNAPSHOT_ENTRY.size, pos)
        if len(raw) < SNAPSHOT_ENTRY.size:
            raise CorruptImageError(img.path, pos, "snapshot table runs past the end of the file")
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra_len) = SNAPSHOT_ENTRY.unpack(raw)
        rest = os.pread(img.fd, extra_len + id_len + name_len, pos + SNAPSHOT_ENTRY.size)
        if len(rest) < extra_len + id_len + name_len:
            raise CorruptImageError(img.path, pos, "snapshot entry runs past the end of the file")
        if l1_offset % img.cluster_size or l1_offset + l1_size * 8 > file_size:
            raise CorruptImageError(img.path, pos, f"snapshot L1 table at 0x{l1_offset:x} is invalid")
        extra = rest[:extra_len]
        disk_size = SNAPSHOT_EXTRA.unpack_from(extra)[1] if extra_len >= SNAPSHOT_EXTRA.size else img.size
        snaps.append(Snapshot(rest[extra_len:extra_len + id_len].decode("utf-8", "replace"),
                              rest[extra_len + id_len:].decode("utf-8", "replace"), l1_offset, l1_size,
                              date_sec, date_nsec, vm_clock, vm_state, disk_size, bytes(extra)))
        pos += SNAPSHOT_ENTRY.size + len(rest)
        pos += -pos % 8
    return snaps


def _pack_snapshots(snaps: list[Snapshot]) -> bytes:
    out = bytearray()
    for s in snaps:
        extra = bytearray(s.extra.ljust(SNAPSHOT_EXTRA.size, b"\0"))
        struct.pack_into(">QQ", extra, 0, s.vm_state_size, s.disk_size)
        ident, name = s.id.encode(), s.name.encode()
        out += SNAPSHOT_ENTRY.pack(s.l1_offset, s.l1_size, len(ident), len(name), s.date_sec, s.date_nsec,
                                   s.vm_clock_nsec, s.vm_state_size if s.vm_state_size < 1 << 32 else 0,
                                   len(extra))
        out += extra + ident + name
        out += bytes(-len(out) % 8)
    return bytes(out)


def _write_snapshot_table(img: ImageBase, snaps: list[Snapshot]) -> None:
    """Writes a new table, switches the header to it, frees the old one."""
    cs = img.cluster_size
    data = _pack_snapshots(snaps)
    old_offset, old_count = img.header.snapshots_offset, img.header.nb_snapshots
    old_bytes = len(_pack_snapshots(read_snapshots(img))) if old_count else 0
    new_offset = 0
    if snaps:
        clusters = -(-len(data) // cs)
        first = img._alloc_run(clusters)
        os.pwrite(img.fd, data, first * cs)
        for c in range(first, first + clusters):
            img._set_refcount(c, 1)
        new_offset = first * cs
    os.pwrite(img.fd, SNAPSHOT_FIELDS.pack(len(snaps), new_offset), OFF_SNAPSHOTS)
    img.header.nb_snapshots, img.header.snapshots_offset = len(snaps), new_offset
    if old_count:
        for c in range(old_offset // cs, -(-(old_offset + old_bytes) // cs)):
            img._change_refcount(c, -1)


def _data_clusters(img: ImageBase, entry: int) -> list[int]:
    kind, host = img.classify(entry)
    if kind == COMPRESSED:
        host, nbytes = compressed_geometry(entry, img.cluster_bits)
        return list(range(host >> img.cluster_bits, ((host + nbytes - 1) >> img.cluster_bits) + 1))
    return [host >> img.cluster_bits] if kind != UNALLOCATED and host else []


def _walk_refs(img: ImageBase, l1: list[int], delta: int) -> None:
    """Adds delta to every L2 table and data cluster reachable from l1."""
    for l1_entry in l1:
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        for entry in list(img._load_l2(l2_offset)):
            for c in _data_clusters(img, entry):
                img._change_refcount(c, delta)
        img._change_refcount(l2_offset // img.cluster_size, delta)


def fix_copied_flags(img: ImageBase) -> None:
    """Sets COPIED exactly where the refcount is 1, in the active tables."""
    for l1i, l1_entry in enumerate(img.l1):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        exclusive = img.get_refcount(l2_offset // img.cluster_size) == 1
        table = img._load_l2(l2_offset)   # a shared table's entries must not say COPIED either
        for i, entry in enumerate(table):
            kind, host = img.classify(entry)
            if kind == COMPRESSED or not host:
                continue
            want = exclusive and img.get_refcount(host // img.cluster_size) == 1
            if bool(entry & OFLAG_COPIED) != want:
                img._set_l2(l2_offset, table, i, entry | OFLAG_COPIED if want else entry & ~OFLAG_COPIED)
        wanted = l1_entry | OFLAG_COPIED if exclusive else l1_entry & ~OFLAG_COPIED
        if wanted != l1_entry:
            img._set_l1(l1i, wanted)


def list_snapshots(img: ImageBase) -> list[Snapshot]:
    return read_snapshots(img)


def _find(img: ImageBase, name: str) -> tuple[list[Snapshot], Snapshot]:
    snaps = read_snapshots(img)
    for s in snaps:
        if s.name == name or s.id == name:
            return snaps, s
    raise ImageError(f"{img.path}: no snapshot named {name!r}")


def create_snapshot(img: ImageBase, name: str, *, vm_state_size: int = 0, vm_clock_nsec: int = 0) -> Snapshot:
    """Raises ImageError if the name is taken or a refcount would overflow.
    vm_state_size: bytes of VM state already in the vmstate area (qcow2_vmstate.py)."""
    if img.readonly:
        raise ImageError(f"{img.path}: image is open read-only")
    snaps = read_snapshots(img)
    if any(s.name == name for s in snaps):
        raise ImageError(f"{img.path}: a snapshot named {name!r} exists")
    cs = img.cluster_size
    # The L1 copy goes into clusters nothing references yet, before any
    # refcount changes: a write the host refuses (a full disk) leaves the
    # image as it was, not with every cluster counted once too often.
    l1 = [e & ~OFLAG_COPIED for e in img.l1]
    clusters = max(1, -(-len(l1) * 8 // cs))
    first = img._alloc_run(clusters)
    os.pwrite(img.fd, struct.pack(f">{len(l1)}Q", *l1), first * cs)
    _walk_refs(img, img.l1, +1)
    for c in range(first, first + clusters):
        img._set_refcount(c, 1)
    fix_copied_flags(img)
    now = time.time_ns()
    ident = str(max((int(s.id) for s in snaps if s.id.isdigit()), default=0) + 1)
    snap = Snapshot(ident, name, first * cs, len(l1), now // 10**9, now % 10**9, vm_clock_nsec, vm_state_size,
                    img.size)
    _write_snapshot_table(img, snaps + [snap])
    os.fsync(img.fd)
    return snap


def delete_snapshot(img: ImageBase, name: str) -> None:
    if img.readonly:
        raise ImageError(f"{img.path}: image is open read-only")
    snaps, snap = _find(img, name)
    _write_snapshot_table(img, [s for s in snaps if s is not snap])
    l1 = img._read_table(snap.l1_offset, snap.l1_size)
    _walk_refs(img, l1, -1)
    cs = img.cluster_size
    for c in range(snap.l1_offset // cs, -(-(snap.l1_offset + snap.l1_size * 8) // cs)):
        img._change_refcount(c, -1)
    fix_copied_flags(img)
    os.fsync(img.fd)


def apply_snapshot(img: ImageBase, name: str) -> None:
    """Reverts the disk to the snapshot (which stays in the table)."""
    if img.readonly:
        raise ImageError(f"{img.path}: image is open read-only")
    _, snap = _find(img, name)
    target = img._read_table(snap.l1_offset, snap.l1_size)
    if snap.disk_size > img.size:
        img.resize(snap.disk_size)
    if len(target) > len(img.l1):
        raise CorruptImageError(img.path, snap.l1_offset, "snapshot L1 table larger than its disk size")
    _walk_refs(img, target, +1)
    old = list(img.l1)
    new = [e & ~OFLAG_COPIED for e in target] + [0] * (len(img.l1) - len(target))
    img.l1[:] = new
    os.pwrite(img.fd, struct.pack(f">{len(new)}Q", *new), img.header.l1_table_offset)
    _walk_refs(img, old, -1)
    if snap.disk_size != img.size:
        os.pwrite(img.fd, U64.pack(snap.disk_size), OFF_SIZE)
        img.header.size = img.size = snap.disk_size
    fix_copied_flags(img)
    img._last_compressed = None
    os.fsync(img.fd)


def empty_active(img: ImageBase) -> None:
    """Unmaps every cluster of the active disk (after a commit): the L1
    table is cleared first, then the references it held are dropped."""
    if img.readonly:
        raise ImageError(f"{img.path}: image is open read-only")
    old = list(img.l1)
    img.l1[:] = [0] * len(old)
    os.pwrite(img.fd, bytes(8 * len(old)), img.header.l1_table_offset)
    _walk_refs(img, old, -1)
    img._last_compressed = None
    os.fsync(img.fd)
