"""Helpers for the storage tests: run qemu-img, fill images with known data,
export an image through pyvmm to a raw file for `qemu-img compare`."""

from __future__ import annotations

import random
import subprocess

from pyvmm.storage import open_image


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))}: rc {result.returncode}: {result.stderr}")
    return result


def fill_raw(path, size: int, seed: int, chunks: int = 24, chunk: int = 48 << 10) -> bytes:
    """Writes random runs (some all-zero) into a raw file; returns its contents."""
    rnd = random.Random(seed)
    data = bytearray(size)
    for i in range(chunks):
        n = rnd.randrange(1, chunk)
        off = rnd.randrange(0, size - n)
        data[off:off + n] = bytes(n) if i % 5 == 4 else rnd.randbytes(n)
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


def export_raw(image_path, out_path, fmt: str | None = None) -> bytes:
    """Reads the whole disk through pyvmm into a raw file; returns the bytes."""
    with open_image(str(image_path), fmt, readonly=True) as img:
        data = img.read(0, img.size)
    with open(out_path, "wb") as f:
        f.write(data)
    return data
