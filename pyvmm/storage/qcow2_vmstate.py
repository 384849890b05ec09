"""The vmstate area of a qcow2 image: where an internal snapshot keeps the
VM's state (CPU, devices, RAM) beside the disk.

As in the qcow2 spec, the area is addressed like guest data but past the
disk's end: it starts at the first L1 entry after the disk, i.e. at
ceil(size / (cluster_size * l2_entries)) * (cluster_size * l2_entries),
so a snapshot's copy of the L1 table carries it along with the disk. The
snapshot table entry records how many bytes it holds (vm_state_size, and
the 64-bit copy in the extra data).

Writing: the active L1 is grown to cover the area, the state goes into
freshly allocated clusters (data, then refcounts, then the L2 entries, the
order qcow2.py keeps for crash safety), the snapshot is taken, and the
active L1's area entries are dropped again, so the running disk does not
keep paying copy-on-write for a state only the snapshot needs.
"""

from __future__ import annotations

import os

from .image import CorruptImageError, ImageError, pread_exact
from .qcow2_layout import DATA, L1E_OFFSET_MASK, OFLAG_COPIED, ZERO

IOV_BATCH = 512          # buffers per pwritev (the kernel takes at most IOV_MAX, 1024)


def area_index(img) -> int:
    """The first L1 index of the vmstate area."""
    span = img.cluster_size * img.l2_entries
    return -(-img.size // span)


def area_offset(img) -> int:
    """The guest offset where the vmstate area starts."""
    return area_index(img) * img.cluster_size * img.l2_entries


def grow_l1(img, entries: int) -> None:
    """Makes the active L1 table at least `entries` long (Qcow2Image.grow_l1)."""
    img.grow_l1(entries)


def drop_area(img) -> None:
    """Unmaps the whole vmstate area from the active L1 table (a snapshot
    that shares it keeps its own references)."""
    for l1i in range(area_index(img), len(img.l1)):
        entry = img.l1[l1i]
        if not entry & L1E_OFFSET_MASK:
            continue
        img._set_l1(l1i, 0)                      # the reference goes first, then the refcounts
        from .qcow2_snapshot import _walk_refs
        _walk_refs(img, [entry], -1)


def write_area(img, data) -> None:
    """Puts `data` (bytes, or a list of buffers written back to back) at
    the start of the (emptied) vmstate area of the active image. Raises
    ImageError for a read-only image."""
    if img.readonly:
        raise ImageError(f"{img.path}: image is open read-only")
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    length = sum(len(p) for p in parts)
    drop_area(img)
    cs = img.cluster_size
    clusters = -(-length // cs)
    if not clusters:
        return
    first_cluster = area_offset(img) // cs
    grow_l1(img, ((first_cluster + clusters - 1) >> img.l2_bits) + 1)
    host = img._alloc_run(clusters)
    parts.append(bytes(clusters * cs - length))
    pos = host * cs
    for i in range(0, len(parts), IOV_BATCH):
        batch = parts[i:i + IOV_BATCH]
        written = os.pwritev(img.fd, batch, pos)
        if written != sum(len(p) for p in batch):       # short write: finish it piece by piece
            _write_all(img.fd, batch, pos)
        pos += sum(len(p) for p in batch)
    for c in range(host, host + clusters):
        img._set_refcount(c, 1)
    for i in range(clusters):
        cluster = first_cluster + i
        l2_offset, table = img._l2_for_write(cluster >> img.l2_bits)
        img._set_l2(l2_offset, table, cluster & (img.l2_entries - 1), ((host + i) * cs) | OFLAG_COPIED)


def _write_all(fd: int, parts: list, pos: int) -> None:
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n


def read_area(img, length: int) -> bytes:
    """The first `length` bytes of the active image's vmstate area (after
    a snapshot was applied). Raises CorruptImageError where the area has
    a hole or a compressed cluster, which no vmstate writer leaves."""
    return _read(img, img.l1, length)


def read_snapshot_area(img, snap) -> bytes:
    """A snapshot's VM state, read through its own L1 table (the active
    disk is not touched). Raises CorruptImageError."""
    if snap.l1_size * 8 > 1 << 28:
        raise CorruptImageError(img.path, snap.l1_offset, "snapshot L1 table is implausibly large")
    return _read(img, img._read_table(snap.l1_offset, snap.l1_size), snap.vm_state_size)


def _read(img, l1: list[int], length: int) -> bytes:
    cs = img.cluster_size
    first = area_offset(img) // cs

    def entry(cluster: int) -> int:
        l1i = cluster >> img.l2_bits
        l2_offset = l1[l1i] & L1E_OFFSET_MASK if l1i < len(l1) else 0
        return img._load_l2(l2_offset)[cluster & (img.l2_entries - 1)] if l2_offset else 0

    parts, done = [], 0
    while done < length:
        cluster = first + done // cs
        kind, host = img.classify(entry(cluster))
        n = min(cs, length - done)
        if kind == ZERO:
            parts.append(bytes(n))
        elif kind != DATA:
            raise CorruptImageError(img.path, cluster * cs, "vmstate area has a hole")
        else:                                    # merge host-contiguous clusters into one pread
            k = 1
            while done + n < length:
                nk, nh = img.classify(entry(cluster + k))
                if nk != DATA or nh != host + k * cs:
                    break
                n += min(cs, length - done - n)
                k += 1
            parts.append(pread_exact(img.fd, n, host))
        done += n
    return b"".join(parts)
