#!/usr/bin/env python3
"""Whole-VM snapshot cost: pyvmm's snapshot-save / snapshot-load against
QEMU's on the same guest in the same run, and QMP query-status latency.

The guest (a Multiboot kernel) fills --fill MiB of RAM with a different
non-zero word per page, then counts on COM1 forever. Each VMM runs it with
--mem MiB of RAM and one qcow2 disk; once the count shows, a QMP client
(pyvmm/api/client.py, for both) times snapshot-save and snapshot-load jobs
from the command to their "concluded" event, reads the VM state's size
from query-block's snapshot list, and times --pings query-status round
trips. QEMU runs under TCG (--qemu-accel) with -blockdev node disk0.

pyvmm's snapshot files (snapshot/file.py) are timed on the same guest:
x-snapshot-file-save full, a diff after three more counts, then
x-snapshot-file-load of each into the running guest (QMP round trip, and
the VMM's own "load-ms"; medians of five), and a "cold" load of the full file after a qcow2
snapshot-load has written all of the guest's RAM; the guest is checked to
count on afterwards.
--mem takes several sizes (512,2048): one pyvmm and one QEMU run each.

Goals (issue 19): save <= 1 s per 512 MiB of RAM (the full file);
restore to a running guest < 50 ms (both file loads, QMP round trip) and
not growing with RAM size; query-status p50 < 1 ms.
Ends with: RESULT key=value ... goal_save=met|missed goal_load=met|missed goal_qmp=met|missed"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyvmm.api.client import QmpClient  # noqa: E402
from pyvmm.storage.create import create_image  # noqa: E402
from tests.api.counterguest import counter_loop  # noqa: E402

FILL_BASE = 0x1000000
LOADS = 5               # file loads timed per kind; the median is reported

# Fills FILL_BASE..FILL_END (pages the snapshot must carry), then counts on COM1.
GUEST = """
    mov $FILL_BASE, %edi
5:  mov %edi, %eax
    mov $1024, %ecx
    rep stosl
    cmp $FILL_END, %edi
    jb 5b
""" + counter_loop(200000)


def build_kernel(fill_mib: int) -> Path:
    from tests.asm import multiboot_kernel
    source = GUEST.replace("FILL_BASE", hex(FILL_BASE)).replace("FILL_END", hex(FILL_BASE + (fill_mib << 20)))
    return multiboot_kernel(source)


class Child:
    """A VMM process with its stdout (the guest's COM1) gathered."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = bytearray()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            self.out += chunk

    def wait_count(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(rb"^[0-9A-F]{8}\r?$", bytes(self.out), re.M):
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.proc.args[0]} exited {self.proc.returncode}: "
                                 f"{self.proc.stderr.read().decode(errors='replace')[-500:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.proc.args[0]}: the guest did not count in {timeout:g} s")
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def job(qmp: QmpClient, command: str, job_id: str, **args) -> float:
    """Seconds from the command to its job's "concluded"; fails on a job error."""
    since = len(qmp.events)
    t = time.perf_counter()
    qmp.execute(command, {"job-id": job_id, **args})
    qmp.wait_event("JOB_STATUS_CHANGE", 600, since=since, match={"id": job_id, "status": "concluded"})
    took = time.perf_counter() - t
    info = next(j for j in qmp.execute("query-jobs") if j["id"] == job_id)
    qmp.execute("job-dismiss", {"id": job_id})
    if "error" in info:
        raise SystemExit(f"{command}: {info['error']}")
    return took


def timed(qmp: QmpClient, command: str, **args) -> tuple[float, dict]:
    t = time.perf_counter()
    r = qmp.execute(command, args)
    return time.perf_counter() - t, r


def file_snapshots(qmp: QmpClient, child: Child, work: Path) -> dict:
    """x-snapshot-file-save full, a diff after more counting, then loads of
    each into the running guest (QMP round trip, and the VMM's own time)."""
    full, diff = str(work / "full.snap"), str(work / "diff.snap")
    out = {}
    out["file_save_full_s"], r = timed(qmp, "x-snapshot-file-save", path=full, type="full")
    out["file_full_mib"] = r["size"] / (1 << 20)
    seen = len(child.out)
    while child.out.count(b"\n", seen) < 3:
        time.sleep(0.01)
    out["file_save_diff_s"], r = timed(qmp, "x-snapshot-file-save", path=diff, type="diff")
    out["file_diff_mib"] = r["size"] / (1 << 20)

    def loads(name: str, path: str, before=lambda: None) -> None:
        """The median of LOADS loads (a shared host stalls single ones)."""
        took, vmm = [], []
        for _ in range(LOADS):
            before()
            t, r = timed(qmp, "x-snapshot-file-load", path=path)
            took.append(t)
            vmm.append(r["load-ms"])
            time.sleep(0.05)                               # the guest runs a little between loads
        out[f"file_load_{name}_s"] = statistics.median(took)
        out[f"file_load_{name}_vmm_ms"] = statistics.median(vmm)

    loads("full", full)
    loads("diff", diff)
    # Cold: RAM written all over first (the qcow2 snapshot's load writes every
    # saved byte into fresh anonymous pages), which the file load replaces.
    loads("cold", full, lambda: job(qmp, "snapshot-load", "cold", tag="bench", vmstate="disk0", devices=["disk0"]))
    seen = len(child.out)
    deadline = time.monotonic() + 60
    while child.out.count(b"\n", seen) < 2:          # the restored guest runs on
        if time.monotonic() > deadline:
            raise SystemExit("pyvmm: the guest did not run on after x-snapshot-file-load")
        time.sleep(0.01)
    return out


def measure(name: str, cmd: list[str], sock: str, pings: int, files: Path | None = None) -> dict:
    child = Child(cmd)
    out: dict = {}
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if child.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name}: no QMP socket ({child.proc.stderr.read().decode(errors='replace')[-500:]})")
            time.sleep(0.02)
        qmp = QmpClient(sock)
        child.wait_count(300)
        where = {"vmstate": "disk0", "devices": ["disk0"]}
        save = job(qmp, "snapshot-save", "save", tag="bench", **where)
        load = job(qmp, "snapshot-load", "load", tag="bench", **where)
        if files is not None:          # pyvmm's snapshot files: RAM mapped lazily on load
            out.update(file_snapshots(qmp, child, files))
        block = qmp.execute("query-block")
        snaps = [s for b in block for s in b.get("inserted", {}).get("image", {}).get("snapshots", [])]
        size = next(s["vm-state-size"] for s in snaps if s["name"] == "bench")
        times = []
        for _ in range(pings):
            t = time.perf_counter()
            qmp.execute("query-status")
            times.append(time.perf_counter() - t)
        times.sort()
        try:
            qmp.execute("quit")
        except Exception:
            pass
        qmp.close()
        return {**out, "save_s": save, "load_s": load, "vmstate_mib": size / (1 << 20),
                "qmp_p50_ms": statistics.median(times) * 1e3, "qmp_p99_ms": times[int(len(times) * 0.99) - 1] * 1e3}
    finally:
        child.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mem", default="512", help="guest RAM, MiB, or several comma-separated (default 512)")
    p.add_argument("--fill", type=int, default=128, help="MiB of RAM the guest fills (default 128)")
    p.add_argument("--engine", default="bt", help="pyvmm engine (default bt)")
    p.add_argument("--qemu-accel", default="tcg", help="QEMU accelerator (default tcg)")
    p.add_argument("--pings", type=int, default=2000, help="query-status round trips (default 2000)")
    args = p.parse_args()
    kernel = build_kernel(args.fill)
    for mem in [int(m) for m in args.mem.split(",")]:
        run_one(args, kernel, mem)
    return 0


def run_one(args, kernel: Path, mem: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="pyvmm-bench-snap-"))
    try:
        res = {}
        disk = work / "pyvmm.qcow2"
        create_image(str(disk), "qcow2", 64 << 20)
        sock = str(work / "pyvmm.sock")
        mine = measure("pyvmm", [sys.executable, "-m", "pyvmm", "run", "--kernel", str(kernel), "--engine",
                                 args.engine, "--mem", f"{mem}M", "--no-reboot", "--drive",
                                 f"file={disk},id=disk0", "--qmp", f"unix:{sock},server,wait=off"], sock, args.pings,
                       files=work)
        res.update({f"pyvmm_{k}": v for k, v in mine.items()})
        qemu = shutil.which("qemu-system-x86_64")
        if qemu:
            qdisk = work / "qemu.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qdisk), "64M"], check=True)
            qsock = str(work / "qemu.sock")
            theirs = measure("qemu", [qemu, "-accel", args.qemu_accel, "-m", str(mem), "-kernel", str(kernel),
                                      "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
                                      "-blockdev", f"driver=file,filename={qdisk},node-name=file0",
                                      "-blockdev", "driver=qcow2,file=file0,node-name=disk0",
                                      "-device", "virtio-blk-pci,drive=disk0",
                                      "-qmp", f"unix:{qsock},server=on,wait=off"], qsock, args.pings)
            res.update({f"qemu_{k}": v for k, v in theirs.items()})
        for k, v in res.items():
            print(f"{k:28s} {v:10.3f}")
        res["goal_save"] = "met" if res["pyvmm_file_save_full_s"] <= mem / 512 else "missed"
        # Restore to a running guest: the file loads (full and diff) from the QMP command to its answer.
        res["goal_load"] = "met" if max(res["pyvmm_file_load_full_s"], res["pyvmm_file_load_diff_s"],
                                        res["pyvmm_file_load_cold_s"]) < 0.05 else "missed"
        res["goal_qmp"] = "met" if res["pyvmm_qmp_p50_ms"] < 1.0 else "missed"
        print(f"RESULT mem_mib={mem} fill_mib={args.fill} engine={args.engine} "
              + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
