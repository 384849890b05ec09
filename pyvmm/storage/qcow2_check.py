"""`check` for qcow2: recount every cluster's references from the tables and
compare with the stored refcounts, as `qemu-img check` does.

A stored refcount above the references is a leak (wasted space); below is
corruption (a later free would release a cluster still in use), as is a
COPIED flag that disagrees with the refcount or a table outside the file.
`repair` "leaks" lowers leaked refcounts; "all" also raises low ones and
rewrites COPIED flags.
"""

from __future__ import annotations

import os

from .checkresult import CheckResult
from .image import ImageBase, ImageError
from .qcow2_layout import DATA, INCOMPAT_CORRUPT, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, \
    compressed_geometry


class _Counter:
    """Reference counts recomputed from the tables."""

    def __init__(self, img: ImageBase, result: CheckResult):
        self.img = img
        self.result = result
        self.file_size = os.fstat(img.fd).st_size
        self.refs = [0] * (-(-self.file_size // img.cluster_size))
        self.copied_wrong: list[tuple[str, int]] = []

    def mark(self, offset: int, length: int, what: str) -> bool:
        cs = self.img.cluster_size
        end = -(-(offset + length) // cs)
        if end > len(self.refs):
            self.result.corruptions += 1
            self.result.messages.append(f"ERROR {what} at offset 0x{offset:x} lies past the end of the file")
            return False
        for c in range(offset // cs, end):
            self.refs[c] += 1
        return True

    def walk(self, l1: list[int], active: bool) -> None:
        img, cs = self.img, self.img.cluster_size
        last_host = None
        for l1_entry in l1:
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            if l2_offset % cs:
                self.result.corruptions += 1
                self.result.messages.append(f"ERROR L2 table at offset 0x{l2_offset:x} is not cluster aligned")
                continue
            if not self.mark(l2_offset, cs, "L2 table"):
                continue
            if active and (img.get_refcount(l2_offset // cs) == 1) != bool(l1_entry & OFLAG_COPIED):
                self.copied_wrong.append(("L2 cluster", l2_offset))
            for entry in img._read_table(l2_offset, img.l2_entries):
                if entry & OFLAG_COMPRESSED:
                    host, nbytes = compressed_geometry(entry, img.cluster_bits)
                    self.mark(host, nbytes, "compressed cluster")
                    if active:   # qemu-img counts every compressed cluster as fragmented
                        self.result.allocated_clusters += 1
                        self.result.compressed_clusters += 1
                        self.result.fragmented_clusters += 1
                    continue
                host = entry & L2E_OFFSET_MASK
                if not host:
                    continue
                if host % cs:
                    self.result.corruptions += 1
                    self.result.messages.append(f"ERROR data cluster at offset 0x{host:x} is not cluster aligned")
                    continue
                if not self.mark(host, cs, "data cluster"):
                    continue
                if active:
                    kind = img.classify(entry)[0]
                    if kind == DATA:
                        self.result.allocated_clusters += 1
                        if last_host is not None and host != last_host + cs:
                            self.result.fragmented_clusters += 1
                        last_host = host
                    if (img.get_refcount(host // cs) == 1) != bool(entry & OFLAG_COPIED):
                        self.copied_wrong.append(("data cluster", host))


def check_qcow2(img: ImageBase, repair: str | None = None) -> CheckResult:
    """Raises ImageError if repair is asked of a read-only image."""
    if repair and img.readonly:
        raise ImageError(f"{img.path}: repairing needs the image open for writing")
    from .qcow2_snapshot import fix_copied_flags, read_snapshots
    result = _count(img, read_snapshots)
    if not repair or not (result.leaks or result.corruptions):
        return result
    counter = result._counter  # type: ignore[attr-defined]
    leaks_fixed = corruptions_fixed = 0
    for c, refs in enumerate(counter.refs):
        stored = img.get_refcount(c)
        if stored > refs:
            img._set_refcount(c, refs)
            leaks_fixed += 1
        elif stored < refs and repair == "all":
            img._set_refcount(c, refs)
            corruptions_fixed += 1
    if repair == "all":
        corruptions_fixed += len(counter.copied_wrong)
        fix_copied_flags(img)
        img._set_incompatible(img.header.incompatible & ~INCOMPAT_CORRUPT)
    os.fsync(img.fd)
    again = _count(img, read_snapshots)
    again.leaks_fixed, again.corruptions_fixed = leaks_fixed, corruptions_fixed
    again.messages = result.messages + again.messages
    return again


def _count(img: ImageBase, read_snapshots) -> CheckResult:
    cs = img.cluster_size
    result = CheckResult(img.path, total_clusters=-(-img.size // cs))
    counter = _Counter(img, result)
    h = img.header
    counter.mark(0, cs, "header")
    if h.l1_size:
        counter.mark(h.l1_table_offset, h.l1_size * 8, "L1 table")
    counter.walk(img.l1, active=True)
    try:
        snaps = read_snapshots(img)
    except ImageError as e:
        result.check_errors += 1
        result.messages.append(f"ERROR {e}")
        snaps = []
    if snaps:
        from .qcow2_snapshot import _pack_snapshots
        counter.mark(h.snapshots_offset, len(_pack_snapshots(snaps)), "snapshot table")
    for snap in snaps:
        if snap.l1_size:
            counter.mark(snap.l1_offset, snap.l1_size * 8, "snapshot L1 table")
        counter.walk(img._read_table(snap.l1_offset, snap.l1_size), active=False)
    counter.mark(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
    for block in img.reftable:
        if block:
            counter.mark(block, cs, "refcount block")
    for what, offset in counter.copied_wrong:
        result.corruptions += 1
        result.messages.append(f"ERROR OFLAG_COPIED {what}: offset 0x{offset:x} refcount "
                               f"{img.get_refcount(offset // cs)}")
    last_used = 0
    for c, refs in enumerate(counter.refs):
        stored = img.get_refcount(c)
        if refs:
            last_used = c + 1
        if stored > refs:
            result.leaks += 1
            result.messages.append(f"Leaked cluster {c} refcount={stored} reference={refs}")
        elif stored < refs:
            result.corruptions += 1
            result.messages.append(f"ERROR cluster {c} refcount={stored} reference={refs}")
    result.image_end_offset = last_used * cs
    result._counter = counter  # type: ignore[attr-defined]
    return result
