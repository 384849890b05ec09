#!/usr/bin/env python3
"""Live migration cost: total time and downtime of pyvmm's pre-copy
migration between two processes, against QEMU (TCG) migrating the same
guest in the same run.

The guest is a Multiboot kernel in two workloads:
  idle   counts on COM1 with a delay loop (one page written);
  load   writes one page every --period TSC ticks, walking a --window MiB
         area (a set dirty rate: pyvmm's TSC runs at 2 GHz, QEMU TCG's at
         the host's), and prints a count every 1024 pages.
For each VMM and workload a source and an `-incoming tcp:` destination
start; the source gets the same migrate-set-parameters (downtime-limit,
max-bandwidth) and `migrate`; query-migrate's total-time, downtime,
transferred bytes, passes and dirty rate are read once it completed, and
the destination must count on.  pyvmm is driven through its own QMP
client, QEMU through the qemu.qmp library.

Goals (issue 20): downtime <= 100 ms idle and <= 300 ms under load.
Ends with: RESULT key=value ... goal_downtime_idle=met|missed goal_downtime_load=met|missed"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyvmm.api.client import QmpClient  # noqa: E402
from tests.api.counterguest import PRINT_COUNTER as PRINT, counter_loop  # noqa: E402

DIRTY_BASE = 0x1000000

IDLE = counter_loop(200000)

LOAD = """
    rdtsc
    mov %eax, %ebp
    xor %edi, %edi
1:  rdtsc
    mov %eax, %ecx
    sub %ebp, %ecx
    cmp $PERIOD, %ecx
    jb 1b
    add $PERIOD, %ebp
    mov %edi, %eax
    and $WINDOW_MASK, %eax
    shl $12, %eax
    incl DIRTY_BASE(%eax)
    inc %edi
    test $1023, %edi
    jnz 1b
PRINT
    jmp 1b
"""


def build_kernel(workload: str, period: int, window_mib: int) -> Path:
    from tests.asm import multiboot_kernel
    if workload == "idle":
        return multiboot_kernel(IDLE)
    pages = window_mib << 8
    if pages & (pages - 1):
        raise SystemExit("--window must be a power of two")
    return multiboot_kernel(LOAD.replace("PERIOD", str(period)).replace("WINDOW_MASK", str(pages - 1))
                            .replace("DIRTY_BASE", hex(DIRTY_BASE)).replace("PRINT", PRINT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A VMM process with its stdout (the guest's COM1) and stderr gathered."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = bytearray()
        self.err = bytearray()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True).start()

    @staticmethod
    def _pump(f, buf: bytearray) -> None:
        for chunk in iter(lambda: f.read1(65536), b""):
            buf += chunk

    def counts(self) -> int:
        return len(re.findall(rb"^[0-9A-F]{8}\r?$", bytes(self.out), re.M))

    def wait_counts(self, n: int, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while self.counts() < n:
            if self.proc.poll() is not None:
                raise SystemExit(f"{what}: exited {self.proc.returncode}: {bytes(self.err)[-500:]!r}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{what}: the guest did not count in {timeout:g} s")
            time.sleep(0.02)

    def wait_socket(self, path: str, what: str) -> None:
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{what}: no QMP socket ({bytes(self.err)[-500:]!r})")
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class PyvmmQmp:
    def __init__(self, path: str):
        self.c = QmpClient(path)

    def cmd(self, name: str, **args):
        return self.c.execute(name, args)

    def close(self) -> None:
        self.c.close()


class QemuQmp:
    def __init__(self, path: str):
        from qemu.qmp.legacy import QEMUMonitorProtocol
        self.c = QEMUMonitorProtocol(path)
        self.c.connect()

    def cmd(self, name: str, **args):
        return self.c.cmd(name, **args)

    def close(self) -> None:
        self.c.close()


def migrate_one(vmm: str, argv: list[str], kernel: Path, work: Path, args) -> dict:
    """Migrates one guest with `argv` + options; returns query-migrate's figures."""
    port = free_port()
    qsrc, qdst = str(work / f"{vmm}-src.qmp"), str(work / f"{vmm}-dst.qmp")
    for p in (qsrc, qdst):
        if os.path.exists(p):
            os.unlink(p)
    qmp_arg = (lambda p: ["--qmp", f"unix:{p},server,wait=off"]) if vmm == "pyvmm" else \
        (lambda p: ["-qmp", f"unix:{p},server=on,wait=off"])
    Qmp = PyvmmQmp if vmm == "pyvmm" else QemuQmp
    src = Child(argv + qmp_arg(qsrc))
    dst = None
    try:
        src.wait_socket(qsrc, f"{vmm} source")
        src.wait_counts(2, 300, f"{vmm} source")
        # The guest's own write rate (the load guest prints once per 1024 pages).
        n0, t0 = src.counts(), time.monotonic()
        src.wait_counts(n0 + 3, 300, f"{vmm} source")
        time.sleep(0.5)
        guest_rate = (src.counts() - n0) * 1024 / (time.monotonic() - t0)
        dst = Child(argv + qmp_arg(qdst) + (["--incoming"] if vmm == "pyvmm" else ["-incoming"])
                    + [f"tcp:127.0.0.1:{port}"])
        dst.wait_socket(qdst, f"{vmm} destination")
        deadline = time.monotonic() + 60
        while (vmm == "pyvmm" and b"waiting for an incoming migration" not in dst.err) or \
                (vmm == "qemu" and not _listening(port)):
            if dst.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{vmm} destination did not listen: {bytes(dst.err)[-500:]!r}")
            time.sleep(0.02)
        q = Qmp(qsrc)
        q.cmd("migrate-set-parameters", **{"downtime-limit": args.downtime_limit,
                                           "max-bandwidth": args.bandwidth << 20})
        q.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + 600
        while (info := q.cmd("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise SystemExit(f"{vmm}: migration did not end in 600 s: {info}")
            time.sleep(0.01)
        if info["status"] != "completed":
            raise SystemExit(f"{vmm}: migration {info['status']}: {info.get('error-desc', '')}")
        before = dst.counts()
        dst.wait_counts(before + 2, 120, f"{vmm} destination")      # the guest goes on there
        try:
            q.cmd("quit")
            q.close()
        except Exception:          # the VMM may hang up first (EOFError, OSError)
            pass
        ram = info.get("ram", {})
        return {"total_ms": float(info["total-time"]), "downtime_ms": float(info["downtime"]),
                "transferred_mib": ram.get("transferred", 0) / (1 << 20),
                "passes": float(ram.get("dirty-sync-count", info.get("dirty-sync-count", 0))),
                "guest_pages_per_s": guest_rate}
    finally:
        src.close()
        if dst is not None:
            dst.close()


def _listening(port: int) -> bool:
    return f":{port:04X} 00000000:0000 0A".encode() in Path("/proc/net/tcp").read_bytes()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mem", type=int, default=128, help="guest RAM, MiB (default 128)")
    p.add_argument("--engine", default="bt", help="pyvmm engine on both sides (default bt)")
    p.add_argument("--period", type=int, default=1_000_000,
                   help="load: TSC ticks between page writes (default 1000000: 2000 pages/s on pyvmm's 2 GHz TSC)")
    p.add_argument("--window", type=int, default=16, help="load: MiB the writes walk (default 16)")
    p.add_argument("--downtime-limit", type=int, default=300, help="ms, both VMMs (default 300)")
    p.add_argument("--bandwidth", type=int, default=1024, help="max-bandwidth, MiB/s, both VMMs (default 1024)")
    p.add_argument("--qemu-accel", default="tcg", help="QEMU accelerator (default tcg)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyvmm-bench-mig-"))
    res: dict = {}
    try:
        qemu = shutil.which("qemu-system-x86_64")
        for workload in ("idle", "load"):
            kernel = build_kernel(workload, args.period, args.window)
            mine = [sys.executable, "-m", "pyvmm", "run", "--kernel", str(kernel), "--engine", args.engine,
                    "--mem", f"{args.mem}M", "--no-reboot"]
            for k, v in migrate_one("pyvmm", mine, kernel, work, args).items():
                if workload == "load" or k != "guest_pages_per_s":
                    res[f"pyvmm_{workload}_{k}"] = v
            if qemu:
                theirs = [qemu, "-accel", args.qemu_accel, "-m", str(args.mem), "-kernel", str(kernel),
                          "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nodefaults"]
                for k, v in migrate_one("qemu", theirs, kernel, work, args).items():
                    if workload == "load" or k != "guest_pages_per_s":
                        res[f"qemu_{workload}_{k}"] = v
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for k, v in res.items():
        print(f"{k:34s} {v:10.3f}")
    res["goal_downtime_idle"] = "met" if res["pyvmm_idle_downtime_ms"] <= 100 else "missed"
    res["goal_downtime_load"] = "met" if res["pyvmm_load_downtime_ms"] <= 300 else "missed"
    print(f"RESULT mem_mib={args.mem} engine={args.engine} period={args.period} window_mib={args.window} "
          + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
