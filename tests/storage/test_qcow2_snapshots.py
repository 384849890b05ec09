"""Internal qcow2 snapshots, checked against qemu-img both ways."""

from __future__ import annotations

from pyvmm.storage import open_image
from pyvmm.storage.create import create_image
from pyvmm.storage.qcow2_snapshot import apply_snapshot, create_snapshot, delete_snapshot, list_snapshots

from .helpers import export_raw, qemu_img

SIZE = 2 << 20


def test_snapshots_made_by_pyvmm_are_seen_and_applied_by_qemu(tmp_path):
    path = tmp_path / "s.qcow2"
    create_image(str(path), "qcow2", SIZE, options={"cluster_size": "4096"})
    with open_image(str(path)) as img:
        img.write(0, b"\xaa" * 10000)
        create_snapshot(img, "first")
        img.write(4096, b"\xbb" * 100)           # copy-on-write of a shared cluster
        img.write(1 << 20, b"\xcc" * 8192)       # a new cluster after the snapshot
        create_snapshot(img, "second")
        img.write(0, b"\xdd" * 4096)
        assert [s.name for s in list_snapshots(img)] == ["first", "second"]
    assert qemu_img("check", path).returncode == 0
    listed = qemu_img("snapshot", "-l", path).stdout
    assert "first" in listed and "second" in listed
    head = export_raw(path, tmp_path / "head.raw")
    assert head[:4096] == b"\xdd" * 4096 and head[4096:4196] == b"\xbb" * 100
    qemu_img("snapshot", "-a", "first", path)
    first = export_raw(path, tmp_path / "first.raw")
    assert first[:10000] == b"\xaa" * 10000 and first[10000:] == bytes(SIZE - 10000)
    assert qemu_img("check", path).returncode == 0


def test_snapshots_made_by_qemu_apply_and_delete_in_pyvmm(tmp_path):
    path = tmp_path / "q.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=8192", path, str(SIZE))
    import subprocess
    subprocess.run(["qemu-io", "-c", "write -P 0x31 0 64k", str(path)], check=True, capture_output=True)
    qemu_img("snapshot", "-c", "base", path)
    subprocess.run(["qemu-io", "-c", "write -P 0x32 8k 8k", "-c", "write -P 0x33 1M 8k", str(path)],
                   check=True, capture_output=True)
    with open_image(str(path)) as img:
        assert img.read(8192, 1) == b"\x32"
        apply_snapshot(img, "base")
        assert img.read(0, 65536) == b"\x31" * 65536 and img.read(1 << 20, 8192) == bytes(8192)
        img.write(0, b"\x34" * 512)
        create_snapshot(img, "mine")
        delete_snapshot(img, "base")
        assert [s.name for s in list_snapshots(img)] == ["mine"]
    assert qemu_img("check", path).returncode == 0
    out = export_raw(path, tmp_path / "out.raw")
    assert out[:512] == b"\x34" * 512 and out[512:65536] == b"\x31" * (65536 - 512)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", path, tmp_path / "out.raw")
    with open_image(str(path)) as img:
        delete_snapshot(img, "mine")
        img.write(0, b"\x35" * 4)                 # refcount back to 1: written in place again
    assert qemu_img("check", path).returncode == 0
    assert "mine" not in qemu_img("snapshot", "-l", path).stdout
