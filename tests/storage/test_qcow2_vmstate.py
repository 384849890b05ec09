"""The vmstate area of qcow2 internal snapshots (pyvmm/storage/qcow2_vmstate.py):
state written beside the disk, carried by a snapshot, listed by qemu-img
with its size, read back after the snapshot is applied, with no leaks."""

from __future__ import annotations

import random

from pyvmm.storage import open_image
from pyvmm.storage.create import create_image
from pyvmm.storage.qcow2_snapshot import apply_snapshot, create_snapshot, delete_snapshot, list_snapshots
from pyvmm.storage.qcow2_vmstate import area_offset, read_area, write_area

from .helpers import export_raw, qemu_img

SIZE = 3 << 20


def _state(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_vmstate_travels_with_the_snapshot_and_qemu_img_lists_its_size(tmp_path):
    path = tmp_path / "vm.qcow2"
    create_image(str(path), "qcow2", SIZE, options={"cluster_size": "4096"})
    state1, state2 = _state(1, 300_001), _state(2, 5000)
    with open_image(str(path)) as img:
        assert area_offset(img) >= img.size
        img.write(0, b"\x11" * 8192)
        write_area(img, state1)
        create_snapshot(img, "one", vm_state_size=len(state1), vm_clock_nsec=1_500_000_000)
        img.write(0, b"\x22" * 4096)
        write_area(img, state2)
        create_snapshot(img, "two", vm_state_size=len(state2))
        write_area(img, b"")                      # the active image keeps no state
        img.write(4096, b"\x33" * 4096)
    assert qemu_img("check", path).returncode == 0      # no leaks, no corruption
    listed = qemu_img("snapshot", "-l", path).stdout
    line = next(row for row in listed.splitlines() if " one " in row)
    assert "293 KiB" in line and "00:00:01.500" in line, listed
    assert export_raw(path, tmp_path / "head.raw")[:8192] == b"\x22" * 4096 + b"\x33" * 4096
    with open_image(str(path)) as img:
        snaps = {s.name: s for s in list_snapshots(img)}
        apply_snapshot(img, "one")
        assert read_area(img, snaps["one"].vm_state_size) == state1
        assert img.read(0, 8192) == b"\x11" * 8192
        apply_snapshot(img, "two")
        assert read_area(img, snaps["two"].vm_state_size) == state2
        delete_snapshot(img, "one")
        write_area(img, b"")
    assert qemu_img("check", path).returncode == 0
    assert "one" not in qemu_img("snapshot", "-l", path).stdout


def test_qemu_applies_a_snapshot_with_vmstate_made_here(tmp_path):
    """qemu-img walks the snapshot's bigger L1 table (disk + vmstate) and
    deletes it cleanly."""
    path = tmp_path / "q.qcow2"
    create_image(str(path), "qcow2", SIZE)
    with open_image(str(path)) as img:
        img.write(65536, b"\x44" * 65536)
        write_area(img, _state(3, 200_000))
        create_snapshot(img, "s", vm_state_size=200_000)
        write_area(img, b"")
        img.write(65536, b"\x55" * 65536)
    qemu_img("snapshot", "-a", "s", path)
    assert export_raw(path, tmp_path / "a.raw")[65536:131072] == b"\x44" * 65536
    qemu_img("snapshot", "-d", "s", path)
    assert qemu_img("check", path).returncode == 0
