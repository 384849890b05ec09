#!/usr/bin/env python3
"""What a run costs in host memory: pyvmm's resident set at the busybox
shell under bt and under hybrid, against QEMU TCG booting the same kernel,
initramfs, command line and guest RAM in the same run (issue 14, part 10).

Each VM boots to PYVMM-INIT-READY, is left alone for --settle seconds,
and then its /proc/PID/status (VmRSS: steady; VmHWM: peak) and smaps are
read.  "Beyond guest RAM" is the RSS less the resident part of the guest
RAM mapping (the anonymous mapping of exactly the guest's size, found in
smaps), i.e. what the VMM itself costs.  Neither VM is asked to touch all
of guest RAM, so both carry only what the boot touched.

bt and hybrid use one block store (engines/bt/blockstore.py) in a fresh
temporary directory unless --bt-cache names one: bt fills it, hybrid reads
it.

Goal: pyvmm's RSS (each engine) at most QEMU's + 30 MiB.
Ends with: RESULT bt_rss_mib=<n|na> hybrid_rss_mib=<n|na> qemu_rss_mib=<n|na>
goal_rss=<met|missed>

Example: bench/rss.py                       # stock kernel, 256 MiB
         bench/rss.py --kernel fitted --engines bt"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.kernel_compare import default_fitted, default_stock  # noqa: E402
from pyvmm.guest.initramfs import READY_MARKER, ensure_default_initramfs  # noqa: E402
from tests.guest_session import GuestSession  # noqa: E402

CMDLINE = "console=ttyS0 reboot=k panic=-1"
QEMU = "qemu-system-x86_64"
GOAL_SLACK_MIB = 30
KIB = 1024


@dataclass
class Rss:
    """One VM's memory at the shell (MiB), or why it was not measured."""
    rss: float = 0.0            # VmRSS after settling
    peak: float = 0.0           # VmHWM
    anon: float = 0.0
    file: float = 0.0
    guest_ram: float | None = None   # resident part of the guest RAM mapping
    boot_s: float = 0.0
    failure: str = ""

    @property
    def beyond(self) -> float | None:
        return None if self.guest_ram is None else self.rss - self.guest_ram


def read_rss(pid: int, guest_bytes: int) -> Rss:
    """VmRSS, VmHWM, RssAnon, RssFile of `pid`, and the resident part of its
    mapping of guest_bytes (to 4 MiB above: QEMU aligns its RAM block)."""
    status = Path(f"/proc/{pid}/status").read_text()

    def field(name: str) -> float:
        m = re.search(rf"^{name}:\s+(\d+) kB", status, re.M)
        return int(m.group(1)) / KIB if m else 0.0

    out = Rss(rss=field("VmRSS"), peak=field("VmHWM"), anon=field("RssAnon"), file=field("RssFile"))
    guest_kib = guest_bytes // KIB
    best = None
    size = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:") and size is not None and guest_kib <= size <= guest_kib + 4096:
            rss = int(line.split()[1])
            best = rss if best is None else max(best, rss)     # the biggest such: guest RAM
    out.guest_ram = None if best is None else best / KIB
    return out


def run_pyvmm(engine: str, kernel: str, initrd: str, mem_mib: int, store: str,
              timeout: float, settle: float) -> Rss:
    start = time.monotonic()
    with GuestSession("run", "--engine", engine, "--kernel", kernel, "--initrd", initrd,
                      "--append", CMDLINE, "--mem", f"{mem_mib}M", "--no-reboot", "--bt-cache", store) as s:
        try:
            s.expect(READY_MARKER, timeout)
        except AssertionError:
            errors = [l for l in s.errors.splitlines() if l.strip()]
            code = s.proc.poll()
            why = f"exit {code} before {READY_MARKER}" if code is not None else f"no {READY_MARKER} in {timeout:.0f} s"
            return Rss(failure=why + (f" ({errors[-1][:100]})" if errors else ""))
        boot_s = time.monotonic() - start
        time.sleep(settle)
        out = read_rss(s.proc.pid, mem_mib << 20)
        out.boot_s = boot_s
        s.send("reboot -f\n")
        try:
            s.wait(60)
        except subprocess.TimeoutExpired:
            pass
        return out


def run_qemu(qemu: str, kernel: str, initrd: str, mem_mib: int, timeout: float, settle: float) -> Rss:
    cmd = [qemu, "-accel", "tcg", "-m", str(mem_mib), "-nographic", "-no-reboot", "-nodefaults",
           "-serial", "stdio", "-kernel", kernel, "-initrd", initrd, "-append", CMDLINE]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = threading.Event()
    tail = bytearray()

    def pump() -> None:
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            tail.extend(chunk)
            del tail[:-4096]
            if READY_MARKER.encode() in tail:
                seen.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not seen.wait(timeout):
            text = tail.decode(errors="replace").strip().splitlines()
            return Rss(failure=f"no {READY_MARKER} in {timeout:.0f} s" + (f" ({text[-1][:100]})" if text else ""))
        boot_s = time.monotonic() - start
        time.sleep(settle)
        out = read_rss(proc.pid, mem_mib << 20)
        out.boot_s = boot_s
        return out
    finally:
        proc.kill()
        proc.wait(30)


def pick_kernel(name: str) -> str | None:
    if name == "stock":
        return default_stock()
    if name == "fitted":
        return default_fitted()
    return name if Path(name).is_file() else None


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", default="stock", help="stock, fitted or a path (default: stock)")
    ap.add_argument("--mem", type=int, default=256, help="guest RAM in MiB (default 256)")
    ap.add_argument("--engines", default="bt,hybrid", help="pyvmm engines to measure (default bt,hybrid)")
    ap.add_argument("--bt-cache", metavar="DIR", help="block store directory (default: a fresh temporary one)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to the marker per boot")
    ap.add_argument("--settle", type=float, default=5, help="seconds at the shell before RSS is read")
    ap.add_argument("--no-qemu", action="store_true", help="skip the QEMU TCG reference")
    args = ap.parse_args(argv)

    kernel = pick_kernel(args.kernel)
    if kernel is None:
        print(f"bench/rss.py: no {args.kernel} kernel here", file=sys.stderr)
        return 1
    initrd = str(ensure_default_initramfs())
    print(f"kernel {kernel}, initrd {initrd}, {args.mem} MiB guest, cmdline {CMDLINE!r}", flush=True)
    results: dict[str, Rss] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = args.bt_cache or tmp
        for engine in [e for e in args.engines.split(",") if e]:
            print(f"booting pyvmm --engine {engine} ...", flush=True)
            results[engine] = run_pyvmm(engine, kernel, initrd, args.mem, store, args.timeout, args.settle)
    qemu = None if args.no_qemu else shutil.which(QEMU)
    if qemu:
        print("booting QEMU TCG ...", flush=True)
        results["qemu-tcg"] = run_qemu(qemu, kernel, initrd, args.mem, args.timeout, args.settle)
    elif not args.no_qemu:
        results["qemu-tcg"] = Rss(failure=f"{QEMU} not installed (Debian package qemu-system-x86)")

    print(f"\n{'VM':10} {'boot s':>7} {'RSS':>6} {'peak':>6} {'anon':>6} {'file':>6} {'guest RAM':>9} {'beyond':>7}  (MiB)")
    for name, r in results.items():
        if r.failure:
            print(f"{name:10} cannot run here: {r.failure}")
            continue
        print(f"{name:10} {r.boot_s:7.1f} {r.rss:6.0f} {r.peak:6.0f} {r.anon:6.0f} {r.file:6.0f} "
              f"{_mib(r.guest_ram):>9} {_mib(r.beyond):>7}")

    def rss(name: str) -> str:
        r = results.get(name)
        return "na" if r is None or r.failure else f"{r.rss:.0f}"

    q = results.get("qemu-tcg")
    ours = [r for n, r in results.items() if n != "qemu-tcg"]
    measurable = q is not None and not q.failure and ours and not any(r.failure for r in ours)
    met = measurable and all(r.rss <= q.rss + GOAL_SLACK_MIB for r in ours)
    print(f"RESULT bt_rss_mib={rss('bt')} hybrid_rss_mib={rss('hybrid')} qemu_rss_mib={rss('qemu-tcg')} "
          f"goal_rss={'met' if met else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
