"""qcow2 against the real qemu-img, both ways: images qemu-img makes read
bit-exactly through pyvmm; images pyvmm writes pass `qemu-img check` and
compare equal to their source."""

from __future__ import annotations

import random

import pytest

from pyvmm.storage import open_image
from pyvmm.storage.create import create_image

from .helpers import export_raw, qemu_img, fill_raw

SIZE = 4 << 20


@pytest.mark.parametrize("opts", ["cluster_size=4096", "cluster_size=65536", "cluster_size=2M",
                                  "compat=0.10", "cluster_size=16K,refcount_bits=8", "refcount_bits=64"])
@pytest.mark.parametrize("compressed", [False, True])
def test_reads_qemu_converted_images_bit_exactly(tmp_path, opts, compressed):
    src = tmp_path / "src.raw"
    data = fill_raw(src, SIZE, seed=hash(opts) & 0xFFFF)
    img = tmp_path / "img.qcow2"
    qemu_img("convert", *(["-c"] if compressed else []), "-O", "qcow2", "-o", opts, src, img)
    out = tmp_path / "out.raw"
    assert export_raw(img, out) == data
    qemu_img("compare", "-f", "raw", "-F", "qcow2", out, img)


def _qemu_io(path, *commands, fmt="qcow2"):
    import subprocess
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


def test_backing_chain_relative_names_and_zero_clusters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    base = tmp_path / "sub" / "base.raw"
    fill_raw(base, SIZE, seed=7)
    # mid names its backing file relative to its own directory; top names mid likewise
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "sub/mid.qcow2")
    _qemu_io("sub/mid.qcow2", "write -P 0xab 64k 200k", "write -z 1M 256k")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "sub/mid.qcow2", "-F", "qcow2", "top.qcow2")
    _qemu_io("top.qcow2", "write -P 0x5c 100k 10k", "write -z 2M 64k", "discard 3M 64k")
    with open_image("top.qcow2", readonly=True) as img:
        assert [b.format for b in img.backing_chain()] == ["qcow2", "raw"]
        assert img.read(1 << 20, 4096) == bytes(4096)
        assert img.read(100 << 10, 2) == b"\x5c\x5c"
    export_raw("top.qcow2", "out.raw")
    qemu_img("compare", "-F", "qcow2", "-f", "raw", "out.raw", "top.qcow2")


def test_backing_file_smaller_than_overlay_reads_zeros_past_its_end(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "1M")
    _qemu_io(base, "write -P 0x11 0 1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "2M")
    with open_image(str(top), readonly=True) as img:
        assert img.read((1 << 20) - 2, 4) == b"\x11\x11\x00\x00"


def _random_writes(img, reference: bytearray, seed: int, count: int = 150) -> None:
    rnd = random.Random(seed)
    for i in range(count):
        n = rnd.randrange(1, 100_000)
        off = rnd.randrange(0, img.size - n)
        if i % 10 == 9:
            img.write_zeroes(off, n)
            reference[off:off + n] = bytes(n)
        else:
            data = rnd.randbytes(n)
            img.write(off, data)
            reference[off:off + n] = data


@pytest.mark.parametrize("cluster_size", ["4096", "65536", "2M"])
def test_pyvmm_written_image_passes_qemu_check_and_compare(tmp_path, cluster_size):
    path = tmp_path / "w.qcow2"
    create_image(str(path), "qcow2", SIZE, options={"cluster_size": cluster_size})
    reference = bytearray(SIZE)
    with open_image(str(path)) as img:
        _random_writes(img, reference, seed=len(cluster_size))
        img.discard(0, 2 << 20)   # whole clusters at every cluster size here
        reference[:2 << 20] = bytes(2 << 20)
    (tmp_path / "ref.raw").write_bytes(reference)
    assert qemu_img("check", path).returncode == 0
    qemu_img("compare", "-f", "qcow2", "-F", "raw", path, tmp_path / "ref.raw")


def test_pyvmm_writes_into_qemu_made_overlay_over_backing(tmp_path):
    base = tmp_path / "base.raw"
    reference = bytearray(fill_raw(base, SIZE, seed=3))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=8192", "-b", base, "-F", "raw", top)
    before = base.read_bytes()
    with open_image(str(top)) as img:
        _random_writes(img, reference, seed=4, count=60)
        img.discard(512 << 10, 128 << 10)   # with a backing file, discarded clusters must read zeros
        reference[512 << 10:640 << 10] = bytes(128 << 10)
    assert base.read_bytes() == before
    (tmp_path / "ref.raw").write_bytes(reference)
    assert qemu_img("check", top).returncode == 0
    qemu_img("compare", "-f", "qcow2", "-F", "raw", top, tmp_path / "ref.raw")


def test_dirty_bit_set_while_open_for_writing_and_cleared_on_close(tmp_path):
    path = tmp_path / "d.qcow2"
    create_image(str(path), "qcow2", SIZE)
    with open_image(str(path)) as img:
        img.write(0, b"x" * 512)
        assert '"dirty-flag": true' in qemu_img("info", "-U", "--output", "json", path).stdout
    assert '"dirty-flag": false' in qemu_img("info", "--output", "json", path).stdout


def test_resize_grows_l1_and_qemu_agrees(tmp_path):
    path = tmp_path / "r.qcow2"
    create_image(str(path), "qcow2", 1 << 20, options={"cluster_size": "4096"})
    with open_image(str(path)) as img:
        img.write(4096, b"\x77" * 4096)
        img.resize(3 << 30)   # L1 grows from 1 to 1536 entries
        img.write((3 << 30) - 4096, b"\x88" * 4096)
    assert qemu_img("check", path).returncode == 0
    with open_image(str(path), readonly=True) as img:
        assert img.size == 3 << 30
        assert img.read(4096, 4) == b"\x77" * 4 and img.read((3 << 30) - 4, 4) == b"\x88" * 4


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
def test_every_refcount_width_qemu_writes_checks_clean(tmp_path, bits):
    """Sub-byte refcounts are packed from each byte's low bits up: a wrong
    guess shows up as leaks and corruption here."""
    from pyvmm.storage.qcow2_check import check_qcow2
    src = tmp_path / "src.raw"
    data = fill_raw(src, SIZE, seed=bits)
    path = tmp_path / "r.qcow2"
    qemu_img("convert", "-O", "qcow2", "-o", f"refcount_bits={bits},cluster_size=4096", src, path)
    with open_image(str(path), readonly=True) as img:
        result = check_qcow2(img)
        assert (result.exit_code, result.leaks, result.corruptions) == (0, 0, 0), result.messages[:3]
        assert result.allocated_clusters > 100
        assert img.read(0, SIZE) == data


def test_lazy_refcounts_left_dirty_by_a_crashed_qemu_are_recounted_before_writing(tmp_path):
    path = tmp_path / "lazy.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "4M")
    import subprocess
    subprocess.run(["qemu-io", "-c", "write -P 0x21 0 256k", "-c", "abort", str(path)], capture_output=True)
    assert '"dirty-flag": true' in qemu_img("info", "--output", "json", path).stdout
    with open_image(str(path)) as img:
        img.write(1 << 20, b"\x22" * 65536)
    assert qemu_img("check", path).returncode == 0
    with open_image(str(path), readonly=True) as img:
        assert img.read(0, 4) == b"\x21" * 4 and img.read(1 << 20, 4) == b"\x22" * 4
