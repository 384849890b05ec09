#!/usr/bin/env python3
"""Boot through the BIOS (issue 21): time from start to the boot loader's
menu and to the shell, pyvmm under each engine against QEMU TCG with the
same SeaBIOS (Debian's /usr/share/seabios/bios.bin) and the same disk
(`pyvmm guest disk`, SYSLINUX, the Debian cloud kernel, ext4 root).

In the same run, the direct kernel boot of the same kernel and pyvmm's
initramfs (pyvmm --kernel/--initrd against QEMU -kernel/-initrd), to the
same shell marker: its pyvmm/QEMU ratio is the goal.

Goal: per engine, the BIOS boot's ratio to QEMU TCG (to the shell) no
worse than the direct boot's ratio measured in this run.
Ends with: RESULT key=value ... goal_ratio=met|missed"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# menu.c32's countdown, drawn before the kernel loads (the kernel prints
# "smpboot:", which a "boot:" marker matched instead of the menu).
MENU = b"Booting linux in "
SHELL = b"PYVMM-INIT-READY"
BASE_CMDLINE = "root=/dev/vda2 console=ttyS0"
DIRECT_CMDLINE = "console=ttyS0 reboot=k panic=-1"


class Timed:
    """A process whose output is watched for markers, each timed from start."""

    def __init__(self, argv: list[str], markers: list[bytes], env: dict | None = None):
        self.markers = markers
        self.seen: dict[bytes, float] = {}
        self.out = bytearray()
        self.done = threading.Event()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while chunk := self.proc.stdout.read1(65536):
            self.out.extend(chunk)
            for m in self.markers:
                if m not in self.seen and m in self.out:
                    self.seen[m] = time.monotonic() - self.t0
            if len(self.seen) == len(self.markers):
                break
        self.done.set()

    def wait(self, timeout: float) -> dict[bytes, float]:
        self.done.wait(timeout)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        return self.seen


def _pyvmm(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyvmm", "run", *args]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="bt,hybrid", help="pyvmm engines to time (default bt,hybrid)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per boot")
    ap.add_argument("--mem", default="512M")
    args = ap.parse_args()

    from pyvmm.engines.bt.bootprep import kernel_args
    from pyvmm.guest.disk_image import default_kernel, make_boot_disk
    from pyvmm.guest.initramfs import ensure_default_initramfs

    kernel = default_kernel()
    initrd = str(ensure_default_initramfs())
    engines = [e for e in args.engines.split(",") if e]
    if "hybrid" in engines and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        engines.remove("hybrid")
    work = Path(tempfile.mkdtemp(prefix="pyvmm-fwbench-"))
    res: dict[str, float | str] = {}
    try:
        disk = work / "disk.qcow2"
        # The parameters pyvmm adds to a direct boot under bt (bootprep.py),
        # on the boot loader's line here, so both boots run the same kernel work.
        make_boot_disk(str(disk), "qcow2", kernel=kernel,
                       cmdline=f"{BASE_CMDLINE} {kernel_args(BASE_CMDLINE, 'tsc=unstable')}")
        direct_append = f"{DIRECT_CMDLINE} {kernel_args(DIRECT_CMDLINE, 'tsc=unstable')}"

        def qemu(*extra: str) -> list[str]:
            return ["qemu-system-x86_64", "-accel", "tcg", "-m", args.mem, "-nographic", "-no-reboot", *extra]

        runs = {
            "qemu_bios": (qemu("-drive", f"file={disk},if=virtio,format=qcow2,snapshot=on"), [MENU, SHELL]),
            "qemu_direct": (qemu("-kernel", kernel, "-initrd", initrd, "-append", direct_append), [SHELL]),
        }
        for e in engines:
            copy = work / f"{e}.qcow2"
            shutil.copyfile(disk, copy)
            runs[f"{e}_bios"] = (_pyvmm("--engine", e, "-m", args.mem, "--no-reboot",
                                        "--drive", f"file={copy},format=qcow2"), [MENU, SHELL])
            runs[f"{e}_direct"] = (_pyvmm("--engine", e, "-m", args.mem, "--no-reboot", "--kernel", kernel,
                                          "--initrd", initrd, "--append", direct_append), [SHELL])
        # SIGTERM (a runner's time limit) ends the runs like Ctrl-C: the
        # RESULT line still comes, with what was measured.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        def record(name: str, markers: list[bytes], seen: dict[bytes, float]) -> None:
            if MENU in markers:
                res[f"{name}_menu_s"] = round(seen.get(MENU, float("nan")), 2)
            res[f"{name}_shell_s"] = round(seen.get(SHELL, float("nan")), 2)
            print(f"{name}: " + ", ".join(f"{m.decode()} {t:.1f} s" for m, t in seen.items()), flush=True)

        name, running = "", None
        try:
            for name, (argv, markers) in runs.items():
                running = Timed(argv, markers, env={"PYVMM_BT_CACHE": "off"})
                seen = running.wait(args.timeout)
                running = None
                record(name, markers, seen)
        except KeyboardInterrupt:
            if running is not None:        # what the interrupted run got to counts
                seen = running.wait(0)
                record(name, running.markers, seen)
            print("interrupted: the runs not listed above were not measured", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    met, measured = True, []
    for e in engines:
        keys = (f"{e}_bios_shell_s", "qemu_bios_shell_s", f"{e}_direct_shell_s", "qemu_direct_shell_s")
        if not all(k in res for k in keys):
            met = False
            continue
        measured.append(e)
        bios = res[f"{e}_bios_shell_s"] / res["qemu_bios_shell_s"]
        direct = res[f"{e}_direct_shell_s"] / res["qemu_direct_shell_s"]
        res[f"{e}_bios_ratio"] = round(bios, 2)
        res[f"{e}_direct_ratio"] = round(direct, 2)
        met = met and bios <= direct     # NaN (a boot that never got there) compares False
    res["measured_engines"] = ",".join(measured) or "none"
    res["goal_ratio"] = "met" if met and engines else "missed"
    print("RESULT " + " ".join(f"{k}={v}" for k, v in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
