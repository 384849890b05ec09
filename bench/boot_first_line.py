#!/usr/bin/env python3
"""Seconds from starting `pyvmm run` to the kernel's first console line
("Linux version ..."), stock Debian cloud kernel under --engine hw:
host-side payload decompression + direct ELF entry, against the kernel's own
in-guest decompressor (the reference, measured in the same run).
Ends with: RESULT direct_s=<s> in_guest_s=<s> speedup=<in_guest/direct>"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARK = b"Linux version"


def time_to_first_line(kernel: str, extra: list[str], timeout: float) -> float:
    cmd = [sys.executable, "-m", "pyvmm", "run", "--engine", "hw", "--kernel", kernel, "--no-reboot",
           "--append", "console=ttyS0 earlyprintk=serial,ttyS0,115200", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    seen = b""
    try:
        while time.perf_counter() - start < timeout:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                raise RuntimeError(f"pyvmm ended (code {proc.wait()}) before the first line")
            seen = (seen + chunk)[-4096:]
            if MARK in seen:
                return time.perf_counter() - start
        raise RuntimeError(f"no first line within {timeout:.0f} s")
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default=(sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64")) or [None])[-1])
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    if not args.kernel or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench: needs /dev/kvm and linux-image-cloud-amd64", file=sys.stderr)
        return 1
    direct = time_to_first_line(args.kernel, [], args.timeout)
    print(f"direct ELF (host decompression): {direct:7.2f} s")
    in_guest = time_to_first_line(args.kernel, ["--no-host-decompress"], args.timeout)
    print(f"bzImage, in-guest decompressor : {in_guest:7.2f} s")
    print(f"RESULT direct_s={direct:.2f} in_guest_s={in_guest:.2f} speedup={in_guest / direct:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
