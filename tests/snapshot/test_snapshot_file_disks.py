"""Snapshot files carry their disks (snapshot/filedisks.py): a qcow2 drive
goes back to what it held at the save when the file loads, in the running
VM and in a fresh one (`--restore`'s path), and `qemu-img snapshot -l`
lists the file's tag; a raw drive that was written after the save makes
the load refuse in one line with the VM untouched; a save that fails
leaves no tag behind."""

from __future__ import annotations

import subprocess

import pytest

from pyvmm.api.commands import CommandError
from pyvmm.config import DriveConfig
from pyvmm.snapshot import file as snapfile
from pyvmm.snapshot.filedisks import TAG_PREFIX
from pyvmm.snapshot.savevm import drives
from pyvmm.storage.create import create_image

from tests.api.counterguest import CounterVm
from tests.hostfacts import require_from_setup

SECTOR = 512
A, B = b"\xaa" * SECTOR, b"\xbb" * SECTOR


@pytest.fixture
def vms():
    made: list[CounterVm] = []

    def make(engine: str, drive_list: list[DriveConfig]) -> CounterVm:
        made.append(CounterVm(engine, drive_list))
        return made[-1]
    yield make
    for vm in made:
        vm.close()


def _disk(vm: CounterVm, name: str = "disk0"):
    """What the drive's virtio-blk device reads and writes through."""
    d = drives(vm.machine)[name]
    return d.device_image or d.image


def _tags(image_path: str) -> list[str]:
    from pyvmm.storage.image import open_image
    from pyvmm.storage.qcow2_snapshot import read_snapshots
    with open_image(image_path, "qcow2", readonly=True) as img:
        return [s.name for s in read_snapshots(img)]


@pytest.mark.parametrize("engine", ["bt", pytest.param("hw", marks=pytest.mark.kvm)])
def test_a_qcow2_drive_goes_back_with_the_file_in_the_running_vm_and_a_fresh_one(tmp_path, vms, engine):
    image, snap = str(tmp_path / "d.qcow2"), str(tmp_path / "s.snap")
    create_image(image, "qcow2", 1 << 20)
    vm = vms(engine, [DriveConfig(file=image, format="qcow2", id="disk0")])
    vm.wait_counts(1)
    vm.qmp("stop")
    _disk(vm).write(8 * SECTOR, A)
    saved = vm.counter()
    vm.qmp("x-snapshot-file-save", path=snap)
    _disk(vm).write(8 * SECTOR, B)                    # after the save: the load must undo it
    _disk(vm).write(64 * SECTOR, B)
    vm.qmp("x-snapshot-file-load", path=snap)
    assert vm.counter() == saved
    assert _disk(vm).read(8 * SECTOR, SECTOR) == A
    assert _disk(vm).read(64 * SECTOR, SECTOR) == bytes(SECTOR)
    vm.qmp("cont")
    vm.wait_counts(1, after=len(vm.output))
    vm.qmp("stop")
    _disk(vm).write(8 * SECTOR, B)
    vm.close()

    fresh = vms(engine, [DriveConfig(file=image, format="qcow2", id="disk0")])   # --restore's path
    fresh.qmp("stop")
    snapfile.load_file(fresh.machine, snap)
    assert fresh.counter() == saved
    assert _disk(fresh).read(8 * SECTOR, SECTOR) == A
    tag = snapfile.read_header(snap).meta["disks"][0]["tag"]
    assert tag.startswith(TAG_PREFIX)
    fresh.close()
    assert _tags(image) == [tag]
    require_from_setup(programs=["qemu-img"], package="qemu-utils")
    listing = subprocess.run(["qemu-img", "snapshot", "-l", image], capture_output=True, text=True, check=True)
    assert tag in listing.stdout
    check = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_raw_drive_written_after_the_save_refuses_the_load(tmp_path, vms):
    image, snap = str(tmp_path / "d.raw"), str(tmp_path / "s.snap")
    create_image(image, "raw", 1 << 20)
    vm = vms("bt", [DriveConfig(file=image, format="raw", id="disk0")])
    vm.wait_counts(1)
    vm.qmp("stop")
    vm.qmp("x-snapshot-file-save", path=snap)
    vm.qmp("x-snapshot-file-load", path=snap)        # unchanged since: loads (kill -9 and restore)
    saved = vm.counter()
    vm.qmp("cont")
    vm.wait_counts(2, after=len(vm.output))
    vm.qmp("stop")
    _disk(vm).write(0, B)
    _disk(vm).flush()
    now = vm.counter()
    with pytest.raises(CommandError, match=r"drive 'disk0' \(raw\) was written after the snapshot") as e:
        vm.qmp("x-snapshot-file-load", path=snap)
    assert "\n" not in str(e.value)
    assert vm.counter() == now != saved               # nothing loaded
    assert _disk(vm).read(0, SECTOR) == B
    vm.qmp("cont")
    vm.wait_counts(1, after=len(vm.output))


def test_a_failed_save_leaves_no_tag_and_a_missing_tag_refuses_the_load(tmp_path, vms):
    image = str(tmp_path / "d.qcow2")
    create_image(image, "qcow2", 1 << 20)
    vm = vms("bt", [DriveConfig(file=image, format="qcow2", id="disk0")])
    vm.wait_counts(1)
    vm.qmp("stop")
    with pytest.raises(CommandError, match="cannot write the snapshot"):
        vm.qmp("x-snapshot-file-save", path=str(tmp_path / "no-such-dir" / "s.snap"))
    d = drives(vm.machine)["disk0"]
    from pyvmm.storage.qcow2_snapshot import delete_snapshot, read_snapshots
    assert read_snapshots(d.image) == []
    snap = str(tmp_path / "s.snap")
    vm.qmp("x-snapshot-file-save", path=snap)
    tag = snapfile.read_header(snap).meta["disks"][0]["tag"]
    delete_snapshot(d.image, tag)
    now = vm.counter()
    with pytest.raises(CommandError, match=f"no internal snapshot '{tag}'"):
        vm.qmp("x-snapshot-file-load", path=snap)
    assert vm.counter() == now


def test_malformed_disk_records_are_refused_in_one_line(tmp_path, vms, monkeypatch):
    from pyvmm.snapshot import filedisks
    image, snap = str(tmp_path / "d.raw"), str(tmp_path / "s.snap")
    create_image(image, "raw", 1 << 20)
    vm = vms("bt", [DriveConfig(file=image, format="raw", id="disk0")])
    vm.wait_counts(1)
    vm.qmp("stop")
    monkeypatch.setattr(filedisks, "capture", lambda machine, ident: [{"id": "disk0", "format": "raw"}])
    vm.qmp("x-snapshot-file-save", path=snap)
    with pytest.raises(CommandError, match="disk records are malformed"):
        vm.qmp("x-snapshot-file-load", path=snap)


def test_a_drive_read_only_at_restore_is_refused_before_anything_changes(tmp_path, vms):
    from pyvmm.snapshot.vmstate import VmStateError
    image, snap = str(tmp_path / "d.qcow2"), str(tmp_path / "s.snap")
    create_image(image, "qcow2", 1 << 20)
    vm = vms("bt", [DriveConfig(file=image, format="qcow2", id="disk0")])
    vm.wait_counts(1)
    vm.qmp("stop")
    vm.qmp("x-snapshot-file-save", path=snap)
    vm.close()
    fresh = vms("bt", [DriveConfig(file=image, format="qcow2", id="disk0", readonly=True)])
    fresh.qmp("stop")
    now = fresh.counter()
    with pytest.raises(VmStateError, match="read-only here"):
        snapfile.load_file(fresh.machine, snap)
    assert fresh.counter() == now
