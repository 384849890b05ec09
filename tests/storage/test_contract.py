"""Every writable format honours the same DiskImage contract: random writes
and zeroings read back like a bytearray model, before and after reopening,
and block_status never calls a range ZERO that holds data."""

from __future__ import annotations

import random

import pytest

from pyvmm.storage import DiskImage, Status, open_image
from pyvmm.storage.create import create_image

SIZE = 2 << 20

CASES = {
    "raw": ("raw", {}),
    "qcow2-4k": ("qcow2", {"cluster_size": "4096"}),
    "qcow2-64k": ("qcow2", {}),
    "vmdk-sparse": ("vmdk", {"subformat": "monolithicSparse"}),
    "vmdk-stream": ("vmdk", {"subformat": "streamOptimized"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_operations_match_a_bytearray(tmp_path, case):
    fmt, options = CASES[case]
    path = str(tmp_path / f"c.{fmt}")
    create_image(path, fmt, SIZE, options=options)
    model = bytearray(SIZE)
    rnd = random.Random(case)
    with open_image(path) as img:
        assert isinstance(img, DiskImage) and img.size == SIZE
        for i in range(120):
            n = rnd.choice([1, 511, 512, 4096, 65536, 70000, rnd.randrange(1, 200_000)])
            off = rnd.randrange(0, SIZE - n)
            if i % 7 == 6:
                img.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
            else:
                data = rnd.randbytes(n)
                img.write(off, data)
                model[off:off + n] = data
            if i % 20 == 0:
                probe = rnd.randrange(0, SIZE - 4096)
                assert img.read(probe, 4096) == model[probe:probe + 4096]
        img.flush()
        assert img.read(0, SIZE) == model
    with open_image(path, readonly=True) as img:
        assert img.read(0, SIZE) == model
        covered = 0
        for ext in img.block_status(0, SIZE):
            assert ext.start == covered and ext.length > 0
            covered += ext.length
            if ext.status != Status.DATA:     # ZERO, or UNALLOCATED without a backing file
                assert model[ext.start:ext.start + ext.length] == bytes(ext.length)
        assert covered == SIZE
