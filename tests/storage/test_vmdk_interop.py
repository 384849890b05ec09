"""VMDK against the real qemu-img: every subformat qemu-img writes reads
bit-exactly; the VMDKs pyvmm writes open, check and convert back in qemu-img."""

from __future__ import annotations

import random
import subprocess

import pytest

from pyvmm.errors import ImageError
from pyvmm.storage import CorruptImageError, open_image
from pyvmm.storage.create import create_image

from .helpers import export_raw, qemu_img, fill_raw

SIZE = 3 << 20


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized", "monolithicFlat",
                                       "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_reads_every_qemu_subformat_bit_exactly(tmp_path, subformat):
    src = tmp_path / "src.raw"
    data = fill_raw(src, SIZE, seed=len(subformat))
    img = tmp_path / "d.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", f"subformat={subformat}", src, img)
    with open_image(str(img), readonly=True) as disk:
        assert disk.subformat == subformat
        assert disk.read(0, disk.size) == data


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_pyvmm_written_vmdk_checks_compares_and_converts_back_in_qemu(tmp_path, subformat):
    src = tmp_path / "src.raw"
    data = fill_raw(src, SIZE, seed=11)
    path = tmp_path / "p.vmdk"
    create_image(str(path), "vmdk", SIZE, options={"subformat": subformat})
    with open_image(str(path)) as img:
        for off in range(0, SIZE, 1 << 20):      # sequential, as a stream is written
            img.write(off, data[off:off + (1 << 20)])
    assert qemu_img("check", path).returncode == 0
    qemu_img("compare", "-F", "raw", path, src)
    qemu_img("convert", "-O", "raw", path, tmp_path / "back.raw")
    assert (tmp_path / "back.raw").read_bytes() == data


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_random_rewrites_of_qemu_made_vmdk(tmp_path, subformat):
    src = tmp_path / "src.raw"
    reference = bytearray(fill_raw(src, SIZE, seed=12))
    path = tmp_path / "q.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", f"subformat={subformat}", src, path)
    rnd = random.Random(13)
    with open_image(str(path)) as img:
        for _ in range(40):
            n = rnd.randrange(1, 90_000)
            off = rnd.randrange(0, SIZE - n)
            chunk = rnd.randbytes(n)
            img.write(off, chunk)
            reference[off:off + n] = chunk
    (tmp_path / "ref.raw").write_bytes(reference)
    assert qemu_img("check", path).returncode == 0
    qemu_img("compare", "-F", "raw", path, tmp_path / "ref.raw")


def test_parent_links_both_ways(tmp_path):
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-f", "vmdk", base, "2M")
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x61 0 1M", str(base)], check=True, capture_output=True)
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x62 64k 4k", str(child)], check=True,
                   capture_output=True)
    with open_image(str(child), readonly=True) as img:
        assert img.backing is not None and img.backing.format == "vmdk"
        assert img.read(60 << 10, 8 << 10) == b"\x61" * 4096 + b"\x62" * 4096
    mine = tmp_path / "mine.vmdk"
    create_image(str(mine), "vmdk", None, backing="base.vmdk")
    with open_image(str(mine)) as img:
        img.write(100, b"\x63" * 10)        # a partial grain: the rest comes from the parent
    export_raw(mine, tmp_path / "mine.raw")
    qemu_img("compare", "-f", "vmdk", "-F", "raw", mine, tmp_path / "mine.raw")
    out = (tmp_path / "mine.raw").read_bytes()
    assert out[:100] == b"\x61" * 100 and out[100:110] == b"\x63" * 10 and out[1 << 20:] == bytes(1 << 20)


def test_hostile_vmdks(tmp_path):
    path = tmp_path / "h.vmdk"
    qemu_img("create", "-f", "vmdk", path, "1M")
    raw = bytearray(path.read_bytes())
    raw[56:64] = (10**9).to_bytes(8, "little")        # grain directory far past the end
    path.write_bytes(raw)
    with pytest.raises(CorruptImageError, match=r"offset 0x7735940000: grain directory lies past the end"):
        open_image(str(path))
    desc = tmp_path / "d.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\nRW 2048 FLAT "missing.img" 0\n')
    with pytest.raises(ImageError, match="missing.img"):
        open_image(str(desc), readonly=True)
    desc.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n')
    with pytest.raises(CorruptImageError, match="lists no extents"):
        open_image(str(desc), "vmdk", readonly=True)


def test_two_gb_extents_read_across_the_extent_boundary(tmp_path):
    """A 5 GiB twoGbMaxExtentSparse disk is three sparse extent files; a
    write across the 2 GiB boundary lands in two of them."""
    path = tmp_path / "t.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", path, "5G")
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x71 2047M 2M",
                    str(path)], check=True, capture_output=True)
    with open_image(str(path), readonly=True) as img:
        assert len(img.extents) == 3 and img.size == 5 << 30
        assert img.read((2047 << 20) - 1, (2 << 20) + 2) == b"\0" + b"\x71" * (2 << 20) + b"\0"
        assert img.read(5 << 29, 4096) == bytes(4096)
