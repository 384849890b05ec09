#!/usr/bin/env python3
"""Block-layer throughput: pyvmm's DiskImage against `qemu-img bench` on the
same files in the same run, for raw, qcow2, qcow2 over a backing file and
VMDK (monolithicSparse), plus `convert` against `qemu-img convert`.

Both sides do the same offsets at queue depth 1 through the host page cache
(qemu-img bench -d 1 -t writeback): 4 KiB accesses striding a prime number of
clusters (scattered over the whole disk, which qemu-img bench can do and
truly random offsets it cannot) and 1 MiB sequential accesses.
Goals (issue 17): raw >= 50 % and qcow2 >= 30 % of qemu-img's 4 KiB IOPS;
convert within 2x of qemu-img convert's time.
Ends with: RESULT key=value ... goal_raw_iops=met|missed goal_qcow2_iops=met|missed goal_convert=met|missed"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyvmm.storage import open_image  # noqa: E402
from pyvmm.storage.create import create_image, parse_size  # noqa: E402
from pyvmm.storage.ops import convert  # noqa: E402

SMALL = 4096
BIG = 1 << 20
STRIDE = 7919 * SMALL       # a prime number of 4 KiB blocks: consecutive accesses land far apart


def offsets(size: int, block: int, step: int, count: int) -> list[int]:
    """The offsets qemu-img bench visits: start at 0, add step, wrap at the end."""
    out, pos = [], 0
    for _ in range(count):
        out.append(pos)
        pos += step
        if pos + block > size:
            pos = pos % (size - block + 1) // block * block
    return out


def pyvmm_run(path: str, fmt: str, block: int, step: int, count: int, write: bool) -> float:
    """Operations per second through pyvmm's block layer."""
    with open_image(path, fmt) as img:
        todo = offsets(img.size, block, step, count)
        data = b"\xa5" * block
        start = time.perf_counter()
        if write:
            for off in todo:
                img.write(off, data)
        else:
            for off in todo:
                img.read(off, block)
        elapsed = time.perf_counter() - start
    return count / elapsed


def qemu_run(path: str, fmt: str, block: int, step: int, count: int, write: bool) -> float:
    args = ["qemu-img", "bench", "-f", fmt, "-c", str(count), "-d", "1", "-s", str(block), "-S", str(step),
            "-t", "writeback", *(["-w"] if write else []), path]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    seconds = float(re.search(r"Run completed in ([\d.]+) seconds", out)[1])
    return count / seconds


def build_images(workdir: Path, size: int) -> dict[str, tuple[str, str]]:
    """raw (filled), qcow2 and vmdk converted from it, and an empty qcow2 overlay over the raw."""
    raw = workdir / "disk.raw"
    block = os.urandom(BIG)
    with open(raw, "wb") as f:
        for _ in range(size // BIG):
            f.write(block)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(workdir / "disk.qcow2")], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", str(raw), str(workdir / "disk.vmdk")], check=True)
    base = workdir / "base.raw"
    shutil.copyfile(raw, base)
    create_image(str(workdir / "overlay.qcow2"), "qcow2", None, backing="base.raw", backing_fmt="raw")
    return {"raw": (str(raw), "raw"), "qcow2": (str(workdir / "disk.qcow2"), "qcow2"),
            "qcow2_backing": (str(workdir / "overlay.qcow2"), "qcow2"), "vmdk": (str(workdir / "disk.vmdk"), "vmdk")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M", help="disk size (default 256M)")
    ap.add_argument("--ops", type=int, default=20000, help="4 KiB operations per measurement (default 20000)")
    ap.add_argument("--convert-size", default="1G", help="size of the disk converted (default 1G; 0 skips)")
    ap.add_argument("--dir", help="work directory (default: a temporary one under /var/tmp)")
    args = ap.parse_args()
    size = parse_size(args.size)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="pyvmm-img-bench-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, str] = {}
    try:
        images = build_images(workdir, size)
        seq_ops = size // BIG
        for name, (path, fmt) in images.items():
            for kind, write in (("read", False), ("write", True)):
                ours = pyvmm_run(path, fmt, SMALL, STRIDE, args.ops, write)
                theirs = qemu_run(path, fmt, SMALL, STRIDE, args.ops, write)
                ours_seq = pyvmm_run(path, fmt, BIG, BIG, seq_ops, write) * BIG / 1e6
                theirs_seq = qemu_run(path, fmt, BIG, BIG, seq_ops, write) * BIG / 1e6
                print(f"{name:14} 4K {kind:5}: pyvmm {ours:9.0f} IOPS  qemu-img {theirs:9.0f} IOPS "
                      f"({100 * ours / theirs:5.1f} %)   1M seq: pyvmm {ours_seq:7.0f} MB/s  "
                      f"qemu-img {theirs_seq:7.0f} MB/s", flush=True)
                result[f"{name}_{kind}_iops"] = f"{ours:.0f}"
                result[f"qemu_{name}_{kind}_iops"] = f"{theirs:.0f}"
                result[f"{name}_{kind}_ratio"] = f"{ours / theirs:.2f}"
                result[f"{name}_seq_{kind}_mbs"] = f"{ours_seq:.0f}"
                result[f"qemu_{name}_seq_{kind}_mbs"] = f"{theirs_seq:.0f}"
        convert_ratio = None
        csize = parse_size(args.convert_size)
        if csize:
            src = workdir / "convert-src.raw"
            with open(src, "wb") as f:          # half data, half holes: convert must skip zeros
                chunk = os.urandom(BIG)
                for i in range(csize // BIG):
                    if i % 2 == 0:
                        f.seek(i * BIG)
                        f.write(chunk)
                f.truncate(csize)
            start = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src), str(workdir / "c-qemu.qcow2")],
                           check=True)
            qemu_s = time.perf_counter() - start
            start = time.perf_counter()
            convert(str(src), str(workdir / "c-pyvmm.qcow2"), dst_fmt="qcow2")
            ours_s = time.perf_counter() - start
            convert_ratio = ours_s / qemu_s
            print(f"convert {csize >> 20} MiB raw->qcow2: pyvmm {ours_s:.2f} s  qemu-img {qemu_s:.2f} s "
                  f"({convert_ratio:.2f}x)")
            result.update(convert_s=f"{ours_s:.2f}", qemu_convert_s=f"{qemu_s:.2f}", convert_ratio=f"{convert_ratio:.2f}")
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)

    def goal(ok: bool) -> str:
        return "met" if ok else "missed"
    raw_ok = min(float(result["raw_read_ratio"]), float(result["raw_write_ratio"])) >= 0.5
    qcow2_ok = min(float(result["qcow2_read_ratio"]), float(result["qcow2_write_ratio"])) >= 0.3
    result["goal_raw_iops"] = goal(raw_ok)
    result["goal_qcow2_iops"] = goal(qcow2_ok)
    if convert_ratio is not None:
        result["goal_convert"] = goal(convert_ratio <= 2.0)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
