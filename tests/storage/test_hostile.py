"""Hostile and corrupt images give one clean ImageError naming the offset,
never a traceback from deep inside the parser."""

from __future__ import annotations

import struct

import pytest

from pyvmm.errors import ImageError, VmmError
from pyvmm.storage import CorruptImageError, open_image
from pyvmm.storage.create import create_image

from .helpers import qemu_img


def _patch(path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _fresh(tmp_path, name="h.qcow2", **opts):
    path = tmp_path / name
    create_image(str(path), "qcow2", 1 << 20, options=opts)
    return path


def test_truncated_header(tmp_path):
    path = tmp_path / "t.qcow2"
    path.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(20))
    with pytest.raises(CorruptImageError, match=r"offset 0x1c: file too short"):
        open_image(str(path))


def test_l1_table_past_end_of_file(tmp_path):
    path = _fresh(tmp_path)
    _patch(path, 40, ">Q", 1 << 40)
    with pytest.raises(CorruptImageError, match=r"offset 0x10000000000: L1 table lies past the end"):
        open_image(str(path))


def test_refcount_order_out_of_range(tmp_path):
    path = _fresh(tmp_path)
    _patch(path, 96, ">I", 7)
    with pytest.raises(CorruptImageError, match=r"offset 0x60: refcount_order 7"):
        open_image(str(path))


def test_refcount_overflow_on_shared_cluster(tmp_path):
    """A cluster whose 8-bit refcount is already 255 cannot gain a reference."""
    path = _fresh(tmp_path, refcount_bits="8", cluster_size="4096")
    with open_image(str(path)) as img:
        img.write(0, b"\x01" * 4096)
        data_cluster = next(img.block_status(0, 4096)).host_offset // 4096
        refblock = img.reftable[0]
    _patch(path, refblock + data_cluster, ">B", 255)
    from pyvmm.storage.qcow2_snapshot import create_snapshot
    with open_image(str(path)) as img:
        with pytest.raises(CorruptImageError, match=rf"offset 0x{data_cluster * 4096:x}: refcount overflow"):
            create_snapshot(img, "s1")


def test_looped_backing_chain(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", b, "1M")
    qemu_img("create", "-f", "qcow2", "-b", b, "-F", "qcow2", a)
    qemu_img("rebase", "-u", "-b", a, "-F", "qcow2", "-f", "qcow2", b)
    with pytest.raises(ImageError, match="backing chain loops"):
        open_image(str(a))


def test_self_backing_and_missing_backing(tmp_path):
    a = _fresh(tmp_path)
    qemu_img("rebase", "-u", "-b", a, "-F", "qcow2", "-f", "qcow2", a)
    with pytest.raises(ImageError, match="loops"):
        open_image(str(a))
    qemu_img("rebase", "-u", "-b", tmp_path / "gone.raw", "-F", "raw", "-f", "qcow2", a)
    with pytest.raises(ImageError, match="gone.raw not found"):
        open_image(str(a))


def test_corrupt_bit_refuses_writing_but_allows_reading(tmp_path):
    path = _fresh(tmp_path)
    _patch(path, 72, ">Q", 2)
    with pytest.raises(ImageError, match="marked corrupt"):
        open_image(str(path))
    with open_image(str(path), readonly=True) as img:
        assert img.read(0, 16) == bytes(16)


def test_unknown_incompatible_feature_and_encryption(tmp_path):
    path = _fresh(tmp_path)
    _patch(path, 72, ">Q", 1 << 40)
    with pytest.raises(ImageError, match="unknown qcow2 incompatible features"):
        open_image(str(path), readonly=True)
    path = _fresh(tmp_path, "e.qcow2")
    _patch(path, 32, ">I", 1)
    with pytest.raises(ImageError, match="encrypted"):
        open_image(str(path), readonly=True)


def test_huge_l1_and_misaligned_l2(tmp_path):
    path = _fresh(tmp_path)
    _patch(path, 36, ">I", 1 << 30)
    with pytest.raises(CorruptImageError, match=r"offset 0x28: L1 table of \d+ bytes is too large"):
        open_image(str(path))
    path = _fresh(tmp_path, "m.qcow2")
    _patch(path, 3 * 65536, ">Q", (1 << 63) | 0x10200)   # L1[0] -> L2 at a non-cluster offset
    with open_image(str(path), readonly=True) as img:
        with pytest.raises(CorruptImageError, match=r"offset 0x10200: L2 table not cluster aligned"):
            img.read(0, 512)


def test_access_outside_the_disk_and_readonly_writes(tmp_path):
    path = _fresh(tmp_path)
    with open_image(str(path), readonly=True) as img:
        with pytest.raises(VmmError, match="outside"):
            img.read((1 << 20) - 1, 2)
        with pytest.raises(VmmError, match="read-only"):
            img.write(0, b"x")
