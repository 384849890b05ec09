"""The disks of a snapshot file, so that memory and disk agree on restore.

A snapshot file holds RAM and device state but not the disks' contents.
At save time, with the vCPUs stopped and every drive flushed:

- a writable qcow2 drive gets an internal snapshot, tagged
  `pyvmm-file-<first 16 hex digits of the file's id>`, that `qemu-img
  snapshot -l` lists; loading the file reverts the drive to it, as
  loadvm does. The tags stay until deleted (`qemu-img snapshot -d`,
  QMP snapshot-delete): any file that names one can still be loaded.
- a writable drive of another format (raw, VMDK) cannot go back in time.
  The file records its size and modification time; loading the file
  refuses, before anything changes, when the image was written since,
  because the guest's memory would then disagree with its disk. A VM
  stopped from the save to a kill -9 (the crash-recovery case) leaves the
  image as it was and restores.
- read-only drives are not recorded.

The records are META's "disks" list: {"id", "format", "tag"} for qcow2,
{"id", "format", "size", "mtime_ns"} for the others. A file without the
list (saved before it existed) restores with the disks as they are.

The file system's timestamps advance in clock ticks (a few ms), so a
write to a raw image within one tick of the save can go unnoticed."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..storage.image import ImageError
from .savevm import Drive, drives
from .vmstate import VmStateError

if TYPE_CHECKING:
    from ..machine import Machine

TAG_PREFIX = "pyvmm-file-"


def tag_for(snapshot_id: str) -> str:
    return TAG_PREFIX + snapshot_id[:16]


def _stat(d: Drive) -> os.stat_result:
    return os.stat(d.image.path)


def capture(machine: "Machine", snapshot_id: str) -> list[dict]:
    """Flushes the writable drives and records each (tagging the qcow2
    ones). The vCPUs are stopped. Raises VmStateError with no tag left
    behind."""
    from ..storage.qcow2_snapshot import create_snapshot
    tag = tag_for(snapshot_id)
    records: list[dict] = []
    for d in drives(machine).values():
        if d.readonly:
            continue
        try:
            d.flush()
            fmt = getattr(d.image, "format", "")
            if fmt == "qcow2":
                create_snapshot(d.image, tag)
                records.append({"id": d.name, "format": fmt, "tag": tag})
            else:
                st = _stat(d)
                records.append({"id": d.name, "format": fmt, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        except (ImageError, OSError) as e:
            forget(machine, records)
            raise VmStateError(f"cannot snapshot drive '{d.name}' with the VM: {e}") from None
    return records


def forget(machine: "Machine", records: list[dict]) -> None:
    """Takes back the tags of a save that failed."""
    from ..storage.qcow2_snapshot import delete_snapshot
    present = drives(machine)
    for r in records:
        if "tag" in r and r["id"] in present:
            try:
                delete_snapshot(present[r["id"]].image, r["tag"])
            except (ImageError, OSError):
                pass


def check(machine: "Machine", records: list[dict], path: str) -> list[tuple[Drive, str]]:
    """The drives to revert, as (drive, tag). Raises VmStateError, the
    machine untouched, when a recorded drive is missing, lacks its tag,
    or (not qcow2) was written since the save."""
    from .savevm import _find
    if not isinstance(records, list) or not all(_well_formed(r) for r in records):
        raise VmStateError(f"{path}: the snapshot's disk records are malformed")
    present = drives(machine)
    revert = []
    for r in records:
        d = present.get(r["id"])
        if d is None:
            raise VmStateError(f"{path}: the snapshot has drive '{r['id']}', this VM has no such drive")
        fmt = getattr(d.image, "format", "")
        if fmt != r["format"]:
            raise VmStateError(f"{path}: drive '{r['id']}' was {r['format']} when saved, it is {fmt} now")
        if "tag" in r:
            if d.readonly:
                raise VmStateError(f"{path}: drive '{r['id']}' is read-only here and cannot go back to the snapshot")
            if _find(d.image, r["tag"]) is None:
                raise VmStateError(f"{path}: drive '{r['id']}' has no internal snapshot '{r['tag']}' "
                                   f"(deleted, or another image)")
            revert.append((d, r["tag"]))
            continue
        d.flush()
        st = _stat(d)
        if (st.st_size, st.st_mtime_ns) != (r["size"], r["mtime_ns"]):
            raise VmStateError(f"{path}: drive '{r['id']}' ({fmt}) was written after the snapshot and "
                               f"cannot go back with it (a qcow2 image can)")
    return revert


def _well_formed(r) -> bool:
    if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not isinstance(r.get("format"), str):
        return False
    if "tag" in r:
        return isinstance(r["tag"], str)
    return isinstance(r.get("size"), int) and isinstance(r.get("mtime_ns"), int)


def revert(revert_list: list[tuple[Drive, str]], path: str) -> None:
    """Brings each qcow2 drive back to its tag. Raises VmStateError."""
    from ..storage.qcow2_snapshot import apply_snapshot
    for d, tag in revert_list:
        try:
            apply_snapshot(d.image, tag)
        except (ImageError, OSError) as e:
            raise VmStateError(f"{path}: cannot revert drive '{d.name}' to '{tag}': {e}") from None
