"""Raw images (sparse, hole punching), format probing, and qcow2 refcount
table growth, which small test images never reach on their own."""

from __future__ import annotations

import os

import pytest

from pyvmm.storage import DiskImage, ImageError, Status, open_image, probe_format
from pyvmm.storage.create import create_image, parse_size

from .helpers import qemu_img


def test_raw_is_sparse_and_discard_punches_holes(tmp_path):
    path = tmp_path / "d.raw"
    create_image(str(path), "raw", 8 << 20)
    assert os.stat(path).st_blocks == 0
    with open_image(str(path)) as img:
        assert isinstance(img, DiskImage) and img.format == "raw"
        img.write(1 << 20, b"\xff" * (1 << 20))
        allocated = os.stat(path).st_blocks
        assert allocated >= (1 << 20) // 512
        statuses = [(e.start, e.length, e.status) for e in img.block_status(0, img.size)]
        assert (1 << 20, 1 << 20, Status.DATA) in statuses
        img.discard(1 << 20, 512 << 10)
        img.write_zeroes((3 << 20) // 2, 512 << 10)
        img.flush()
        assert os.stat(path).st_blocks < allocated // 4
        assert img.read(1 << 20, 1 << 20) == bytes(1 << 20)
        assert img.size == 8 << 20


def test_probe_and_explicit_format(tmp_path):
    for fmt in ("raw", "qcow2", "vmdk"):
        path = tmp_path / f"x.{fmt}"
        qemu_img("create", "-f", fmt, path, "1M")
        assert probe_format(str(path)) == fmt
        with open_image(str(path), readonly=True) as img:
            assert img.format == fmt and img.size == 1 << 20
    with open_image(str(tmp_path / "x.qcow2"), "raw", readonly=True) as img:   # forced raw: the file itself
        assert img.read(0, 4) == b"QFI\xfb"
    with pytest.raises(ImageError, match="unknown image format"):
        open_image(str(tmp_path / "x.raw"), "vdi")


@pytest.mark.parametrize("text,value", [("512", 512), ("64K", 65536), ("1.5M", 3 << 19), ("2G", 2 << 30),
                                        ("1t", 1 << 40)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_refcount_table_grows_when_the_file_outgrows_it(tmp_path):
    """With 4 KiB clusters and 64-bit refcounts one refcount block covers
    512 clusters and a one-cluster table 512 blocks (1 GiB); shrinking the
    table's capacity in memory makes a 3 MiB write cross it."""
    path = tmp_path / "g.qcow2"
    create_image(str(path), "qcow2", 16 << 20, options={"cluster_size": "4096", "refcount_bits": "64"})
    with open_image(str(path)) as img:
        img.reftable_capacity = 1        # pretend the table holds one entry: the next block must move it
        img.write(0, b"\x5a" * (3 << 20))
        assert img.header.refcount_table_offset != 4096
    assert qemu_img("check", path).returncode == 0
    with open_image(str(path), readonly=True) as img:
        assert img.read(0, 3 << 20) == b"\x5a" * (3 << 20)
