"""QEMU-style internal snapshots of a whole VM: savevm / loadvm / delvm.

The VM state (vmstate.py) goes into the vmstate area of the qcow2 drive
named as `vmstate`, and every drive in `devices` gets an internal
snapshot with the same tag, taken while the vCPUs are stopped, so memory
and disks agree and `qemu-img snapshot -l` lists them. Drives are named
by their id= (or virtio-blk<N> without one).

Nothing is left half-way: a save that fails on one drive deletes the
snapshots it already made; a load reads and checks the VM state and
finds the tag on every drive before it reverts any of them.

The caller stops the vCPUs (Machine.pause) around save_vm and load_vm."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import hotplugged
from ..errors import VmmError
from ..storage.image import ImageError
from . import vmstate

if TYPE_CHECKING:
    from ..machine import Machine

log = logging.getLogger(__name__)


class SnapshotError(VmmError):
    """A snapshot cannot be saved, loaded or deleted (QEMU's wording where it has one)."""


@dataclass
class Drive:
    name: str
    image: object       # the open format driver (Qcow2Image, RawImage...) of the drive
    readonly: bool
    device_image: object = None   # what the virtio-blk device uses (maybe a cache-mode wrapper)

    def flush(self) -> None:
        (self.device_image or self.image).flush()

    @property
    def snapshots_ok(self) -> bool:
        return getattr(self.image, "format", "") == "qcow2" and not self.readonly


def drives(machine: "Machine") -> dict[str, Drive]:
    """The machine's virtio-blk drives by name, in --drive order."""
    found = {}
    for i, cfg in enumerate(machine.config.drives):
        name = cfg.id or f"virtio-blk{i}"
        function = machine.devices.get(name.replace("-", "_"))
        image = getattr(getattr(function, "device", None), "image", None)
        if image is not None:
            found[name] = Drive(name, _unwrap(image), cfg.readonly, image)
    for name in getattr(machine, "hotplugged_drives", {}):      # api/hotplug.py's device_add
        device = getattr(machine.devices.get(name.replace("-", "_")), "device", None)
        if device is not None:
            found[name] = Drive(name, _unwrap(device.image), bool(device.readonly), device.image)
    return found


def _unwrap(image):
    """The format driver under a cache-mode wrapper (storage/cache.py): the
    snapshot code edits its tables directly."""
    try:
        from ..storage.cache import CachedImage
    except ImportError:
        return image
    while isinstance(image, CachedImage):
        image = image.image
    return image


def _pick(machine: "Machine", vmstate_drive: str | None, devices: list[str] | None) -> tuple[Drive, list[Drive]]:
    """The vmstate drive and the drives to snapshot (default as HMP's
    savevm: every writable drive, the state on the first)."""
    known = drives(machine)
    if devices is None:
        chosen = [d for d in known.values() if not d.readonly]
    else:
        chosen = []
        for name in devices:
            if name not in known:
                raise SnapshotError(f"No block device node '{name}'")
            chosen.append(known[name])
    for d in chosen:
        if not d.snapshots_ok:
            raise SnapshotError(f"Device '{d.name}' is writable but does not support snapshots")
    if vmstate_drive is None:
        if not chosen:
            raise SnapshotError("No block device can accept snapshots")
        target = chosen[0]
    else:
        if vmstate_drive not in known:
            raise SnapshotError(f"No block device node '{vmstate_drive}'")
        target = known[vmstate_drive]
        if target not in chosen:
            raise SnapshotError(f"vmstate block device '{vmstate_drive}' does not exist in the device list")
    return target, chosen


def _find(image, tag: str):
    from ..storage.qcow2_snapshot import read_snapshots
    for s in read_snapshots(image):
        if s.name == tag:
            return s
    return None


def save_vm(machine: "Machine", tag: str, vmstate_drive: str | None = None, devices: list[str] | None = None,
            *, replace: bool = False) -> int:
    """Saves the stopped machine as `tag`; returns the VM state's size.
    replace: an existing snapshot of that tag is deleted first (HMP savevm).
    Raises SnapshotError."""
    from ..storage.qcow2_snapshot import create_snapshot, delete_snapshot
    from ..storage.qcow2_vmstate import write_area
    target, chosen = _pick(machine, vmstate_drive, devices)
    for d in chosen:
        if _find(d.image, tag) is not None:
            if not replace:
                raise SnapshotError(f"Snapshot '{tag}' already exists in one or more devices")
            delete_snapshot(d.image, tag)
    state = vmstate.capture_parts(machine)        # views of RAM: written before the vCPUs run again
    size = sum(len(p) for p in state)
    clock = machine.devices.get("clock")
    clock_ns = int(clock.now_ns()) if clock is not None and hasattr(clock, "now_ns") else 0
    done = []
    try:
        with machine.lock:
            for d in chosen:
                d.flush()
                if d is target:
                    write_area(d.image, state)
                    create_snapshot(d.image, tag, vm_state_size=size, vm_clock_nsec=clock_ns)
                    write_area(d.image, b"")          # the running disk keeps no state
                else:
                    create_snapshot(d.image, tag, vm_clock_nsec=clock_ns)
                done.append(d)
    except (ImageError, OSError) as e:
        failed = d.name                               # (the loop below rebinds d)
        for d in done:                                # nothing half-way
            try:
                delete_snapshot(d.image, tag)
            except (ImageError, OSError):
                log.warning("could not take back snapshot %r of %s", tag, d.name)
        raise SnapshotError(f"Error while creating snapshot on '{failed}': {e}") from None
    log.info("saved snapshot %r: %d bytes of VM state on %s, %d drive(s)", tag, size, target.name, len(chosen))
    return size


def load_vm(machine: "Machine", tag: str, vmstate_drive: str | None = None,
            devices: list[str] | None = None) -> None:
    """Loads `tag` into the stopped machine: the drives revert, RAM, vCPUs
    and devices take the saved state. Raises SnapshotError (and VmStateError
    through it) with nothing changed when the snapshot is missing or bad."""
    from ..storage.qcow2_snapshot import apply_snapshot
    from ..storage.qcow2_vmstate import drop_area, grow_l1, read_snapshot_area
    if vmstate_drive is None:                        # HMP loadvm: the drive that has the state
        candidates = [d for d in drives(machine).values() if d.snapshots_ok]
        holder = next((d for d in candidates if (s := _find(d.image, tag)) is not None and s.vm_state_size), None)
        if holder is None:
            raise SnapshotError(f"Snapshot '{tag}' does not exist in one or more devices")
        vmstate_drive = holder.name
    # Drives named in `devices` that this machine lacks may be device_add's
    # of the saved one: plugged back below, from the state's records.
    present = None if devices is None else [n for n in devices if n in drives(machine)]
    try:
        target, chosen = _pick(machine, vmstate_drive, present)
    except SnapshotError:
        if present != devices:
            _pick(machine, vmstate_drive, devices)        # names the drive this machine lacks
        raise
    snaps = {d.name: _find(d.image, tag) for d in chosen}
    if any(s is None for s in snaps.values()):
        raise SnapshotError(f"Snapshot '{tag}' does not exist in one or more devices")
    snap = snaps[target.name]
    if not snap.vm_state_size:
        raise SnapshotError(f"Snapshot '{tag}' on '{target.name}' has no VM state")
    try:
        state = read_snapshot_area(target.image, snap)
    except (ImageError, OSError) as e:
        raise SnapshotError(f"Error while reading the VM state of '{tag}': {e}") from None
    try:
        checked = vmstate.check(machine, state)
    except vmstate.VmStateError as e:
        raise SnapshotError(str(e)) from None
    with machine.lock:
        # device_add's drives this machine lacks come back first, so that
        # their disks revert to the tag with the others.
        try:
            replugged = vmstate.replug_or_refuse(machine, checked[3])
        except vmstate.VmStateError as e:
            raise SnapshotError(str(e)) from None
        checked = (*checked[:3], [])
        if replugged or present != devices:
            try:
                target, chosen = _pick(machine, vmstate_drive, devices)
                snaps = {d.name: _find(d.image, tag) for d in chosen}
                if any(s is None for s in snaps.values()):
                    raise SnapshotError(f"Snapshot '{tag}' does not exist in one or more devices")
            except SnapshotError:
                for ident in replugged:
                    hotplugged.unplug(machine, ident)
                raise
        for d in chosen:
            try:
                grow_l1(d.image, snaps[d.name].l1_size)     # the snapshot's table covers its vmstate too
                apply_snapshot(d.image, tag)
                drop_area(d.image)
            except (ImageError, OSError) as e:
                raise SnapshotError(f"Error while reverting '{d.name}' to '{tag}': {e}") from None
        try:
            vmstate.apply(machine, state, checked)
        except vmstate.VmStateError as e:
            raise SnapshotError(str(e)) from None
    log.info("loaded snapshot %r (%d bytes of VM state from %s)", tag, len(state), target.name)


def delete_vm(machine: "Machine", tag: str, devices: list[str] | None = None) -> list[str]:
    """Deletes `tag` from the drives (every snapshot-capable drive by
    default); returns the names of those that had it. Raises SnapshotError
    when named drives lack it."""
    from ..storage.qcow2_snapshot import delete_snapshot
    if devices is None:
        chosen = [d for d in drives(machine).values() if d.snapshots_ok]
    else:
        _, chosen = _pick(machine, None, devices) if devices else (None, [])
    had = [d for d in chosen if _find(d.image, tag) is not None]
    if devices is not None and len(had) != len(chosen):
        missing = next(d.name for d in chosen if d not in had)
        raise SnapshotError(f"Snapshot '{tag}' not found on device '{missing}'")
    if devices is None and not had:
        raise SnapshotError(f"Snapshot '{tag}' not found")
    with machine.lock:
        for d in had:
            try:
                delete_snapshot(d.image, tag)
            except (ImageError, OSError) as e:
                raise SnapshotError(f"Error while deleting snapshot on '{d.name}': {e}") from None
    return [d.name for d in had]


def info_snapshots(machine: "Machine") -> str:
    """HMP's `info snapshots` table: the snapshots on the VM state's drive."""
    from ..storage.qcow2_snapshot import read_snapshots
    capable = [d for d in drives(machine).values() if d.snapshots_ok]
    if not capable:
        return "No available block device supports snapshots\r\n"
    holder = capable[0]
    snaps = [s for s in read_snapshots(holder.image)
             if all(_find(d.image, s.name) is not None for d in capable)]
    if not snaps:
        return "There is no snapshot available.\r\n"
    lines = ["List of snapshots present on all disks:",
             f"{'ID':<8}{'TAG':<20}{'VM SIZE':>12}  {'DATE':<20}{'VM CLOCK':>16}"]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        secs = s.vm_clock_nsec // 10**9
        clock = f"{secs // 3600:04d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{s.vm_clock_nsec % 10**9 // 10**6:03d}"
        lines.append(f"{'--':<8}{s.name:<20}{_size(s.vm_state_size):>12}  {date:<20}{clock:>16}")
    return "\r\n".join(lines) + "\r\n"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return str(n)
