#!/usr/bin/env python3
"""Seconds and guest instructions from starting the VM to PYVMM-INIT-READY,
stock Debian cloud kernel + pyvmm's default initramfs, under --engine bt
with shadow page tables and with --mmu nested; QEMU TCG boots the same
kernel and initramfs in the same run as the reference (installed with
apt-get when missing, unless --no-install; pyvmm itself never uses QEMU).
Then, in each bt guest's shell, a fork/exec-heavy loop (forkwait: N times
fork + exec of /bin/uname and wait) timed under shadow vs nested.

--kernel fitted boots the kernel `pyvmm kernel build` cached (found as
bench/kernel_compare.py finds it; ~28 s to the shell instead of ~2 min) for
quick shadow-vs-nested forkwait comparisons; --kernel PATH boots any image.
Each bt run also writes --stats-json, and the MMU counters of the whole run
(boot + forkwait: page walks, shadow fills, re-syncs, page-table writes,
TLB flushes, guest page faults) are printed per mode.

Guest instructions for bt come from the engine's counter, read with
SIGUSR2 (the probe line "pyvmm-probe: N insns" on stderr) when the marker
appears and around forkwait; for QEMU from its "insn" TCG plugin when the
package ships it, else n/a.  bt runs use --deterministic unless
--host-clock (guest time from instructions: the counts do not depend on
how busy the host is).

Ends with one line:
RESULT bt_shadow_s=<s> bt_shadow_insns=<n> forkwait_shadow_s=<s> forkwait_shadow_cpu_s=<s>
       bt_nested_s=<s> bt_nested_insns=<n> forkwait_nested_s=<s> forkwait_nested_cpu_s=<s>
       qemu_tcg_s=<s> qemu_tcg_insns=<n|na> goal_120s=<met|missed> shadow_beats_nested=<yes|no|na>
shadow_beats_nested compares the forkwait loop's CPU seconds of the two VMM
processes (wall seconds when /proc is unreadable): on a shared host the
wall clock mostly measures the neighbours.  The bt runs' stats JSON gives
the MMU counters printed per mode.
Example, quick: bench/bt_boot.py --kernel fitted --no-qemu --forkwait 100"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.guest_session import GuestSession  # noqa: E402

MARK = b"PYVMM-INIT-READY"
CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1"
QEMU = "qemu-system-x86_64"
PROBE_RX = re.compile(r"pyvmm-probe: (\d+) insns")


def wait_marker(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[float | None, int | None]:
    """Runs cmd; returns (seconds until MARK appeared or None, exit code or None)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    seen = b""
    at = None
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        while time.perf_counter() - start < timeout:
            chunk = proc.stdout.read(65536)
            if chunk:
                seen = (seen + chunk)[-4096:]
                if at is None and MARK in seen:
                    at = time.perf_counter() - start
            elif proc.poll() is not None:
                break
            else:
                time.sleep(0.05)
        try:
            code = proc.wait(timeout=60 if at is not None else 0.1)
        except subprocess.TimeoutExpired:
            code = None
        return at, code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def probe_insns(g: GuestSession, timeout: float = 30) -> int | None:
    """Asks the bt engine (SIGUSR2) for its instruction count."""
    before = len(PROBE_RX.findall(g.errors))
    g.proc.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = PROBE_RX.findall(g.errors)
        if len(found) > before:
            return int(found[-1])
        time.sleep(0.05)
    return None


COUNTERS = ("page_walks", "shadow_fills", "shadow_global_hits", "shadow_resyncs", "page_table_writes",
            "shadow_syncs", "tlb_flushes", "guest_page_faults", "instructions")   # those the engine reports


def read_counters(path: str) -> dict[str, object]:
    """The MMU counters from a --stats-json file ({} when unreadable)."""
    try:
        eng = json.loads(Path(path).read_text()).get("engine", {})
    except (OSError, ValueError):
        return {}
    return {k: eng[k] for k in COUNTERS if k in eng}


def resolve_kernel(spec: str) -> str | None:
    """"stock" (None: pyvmm's default), "fitted" (the cached build) or a path.
    Raises SystemExit when the fitted kernel has not been built."""
    if spec == "stock":
        return None
    if spec == "fitted":
        from pyvmm.kernel.build import IMAGE_PATH
        from pyvmm.kernel.source import cache_dir
        found = sorted(glob.glob(str(cache_dir() / "build-*" / IMAGE_PATH)))
        if not found:
            raise SystemExit("no fitted kernel: run `python3 -m pyvmm kernel build` first")
        return found[-1]
    return spec


def run_bt(mmu: str, timeout: float, extra_append: str, deterministic: bool,
           forkwait: int, kernel: str | None = None, initrd: str | None = None) -> dict[str, object]:
    """One bt boot: seconds and instructions to the marker, then forkwait."""
    stats = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
    stats.close()
    # --no-bt-cache: every run translates afresh, as runs did before the
    # block store, so shadow and nested (and earlier runs) compare like for like.
    cmd = ["run", "--engine", "bt", "--mmu", mmu, "--no-reboot", "--mem", "512M", "--no-bt-cache",
           "--append", f"{CMDLINE} {extra_append}".strip(), "--stats-json", stats.name]
    if kernel is not None:
        cmd += ["--kernel", kernel]
    if initrd is not None:
        cmd += ["--initrd", initrd]
    if deterministic:
        cmd.append("--deterministic")
    out: dict[str, object] = {"s": None, "insns": None, "forkwait_s": None, "forkwait_insns": None,
                              "forkwait_cpu_s": None, "counters": {}}
    try:
        _session(cmd, timeout, forkwait, out)
        out["counters"] = read_counters(stats.name)
    finally:
        os.unlink(stats.name)
    return out


def _session(cmd: list[str], timeout: float, forkwait: int, out: dict[str, object]) -> None:
    start = time.perf_counter()
    with GuestSession(*cmd) as g:
        try:
            g.expect("PYVMM-INIT-READY", timeout=timeout)
        except AssertionError:
            g.kill()
            return
        out["s"] = time.perf_counter() - start
        out["insns"] = probe_insns(g)
        if forkwait > 0:
            # busybox ash may follow its prompt with a cursor-position query (ESC [6n)
            g.expect(r"[#$] (\x1b\[6n)?$", timeout=600)
            loop = (f"i=0; while [ $i -lt {forkwait} ]; do /bin/uname >/dev/null; i=$((i+1)); done; "
                    "echo FORK\"\"WAIT-DONE\n")  # the echoed command line must not match
            n0 = probe_insns(g)
            c0 = cpu_seconds(g.proc.pid)
            t0 = time.perf_counter()
            g.send(loop)
            try:
                g.expect("FORKWAIT-DONE\r?\n", timeout=timeout)
                out["forkwait_s"] = time.perf_counter() - t0
                c1 = cpu_seconds(g.proc.pid)
                if c0 is not None and c1 is not None:
                    out["forkwait_cpu_s"] = c1 - c0
                n1 = probe_insns(g)
                out["forkwait_insns"] = n1 - n0 if n0 is not None and n1 is not None else None
            except AssertionError:
                pass
        g.send("poweroff -f\n")
        try:
            g.wait(timeout=120)
        except subprocess.TimeoutExpired:
            g.kill()


def ensure_qemu(install: bool) -> str | None:
    path = shutil.which(QEMU)
    if path is None and install:
        subprocess.run(["apt-get", "install", "-y", "qemu-system-x86"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        path = shutil.which(QEMU)
    return path


def insn_plugin() -> str | None:
    found = glob.glob("/usr/lib/*/qemu/plugins/libinsn.so") + glob.glob("/usr/lib/qemu/plugins/libinsn.so")
    return found[0] if found else None


def qemu_cmdline() -> str:
    """The bt boots' command line (with the parameters pyvmm adds under bt),
    plus pyvmm.poweroff so QEMU exits at the marker."""
    from pyvmm.engines.bt.bootprep import kernel_args
    return f"{CMDLINE} {kernel_args(CMDLINE)} pyvmm.poweroff"


def run_qemu(qemu: str, kernel: str, initrd: str, timeout: float) -> tuple[float | None, int | None]:
    base = [qemu, "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", kernel, "-initrd", initrd, "-append", qemu_cmdline()]
    secs, _ = wait_marker(base, timeout)
    plugin = insn_plugin()
    insns = None
    if plugin is not None:
        with tempfile.TemporaryDirectory() as d:
            log = os.path.join(d, "insn.log")
            wait_marker(base + ["-plugin", plugin, "-d", "plugin", "-D", log], timeout)
            try:
                text = Path(log).read_text()
                insns = int(text.split("insns:")[-1].split()[0])
            except (OSError, ValueError, IndexError):
                insns = None
    return secs, insns


def fmt(v) -> str:
    if v is None:
        return "na"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per boot (default 3600)")
    ap.add_argument("--modes", default="shadow,nested", help="bt MMU modes to measure")
    ap.add_argument("--append", default="", help="extra kernel command line for the bt boots")
    ap.add_argument("--forkwait", type=int, default=100, help="fork+exec iterations in the guest (0: skip)")
    ap.add_argument("--kernel", default="stock",
                    help="stock (default), fitted (the `pyvmm kernel build` cache) or a bzImage path")
    ap.add_argument("--host-clock", action="store_true", help="bt guest time from the host clock")
    ap.add_argument("--no-qemu", action="store_true", help="skip the QEMU TCG reference")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install QEMU")
    args = ap.parse_args()
    from pyvmm.cli.main import default_kernel
    from pyvmm.guest.initramfs import ensure_default_initramfs
    bt_kernel = resolve_kernel(args.kernel)
    kernel = bt_kernel or default_kernel()
    initrd = str(ensure_default_initramfs())
    res: dict[str, object] = {}
    for mode in [m for m in args.modes.split(",") if m]:
        r = run_bt(mode, args.timeout, args.append, not args.host_clock, args.forkwait, bt_kernel,
                   initrd if bt_kernel else None)
        print(f"bt --mmu {mode}: {fmt(r['s'])} s to the marker, {fmt(r['insns'])} guest instructions; "
              f"forkwait x{args.forkwait}: {fmt(r['forkwait_s'])} s ({fmt(r['forkwait_cpu_s'])} s CPU), "
              f"{fmt(r['forkwait_insns'])} instructions",
              flush=True)
        counters = r["counters"]
        if counters:
            print(f"  counters ({mode}, whole run): " + " ".join(f"{k}={v}" for k, v in counters.items()),
                  flush=True)
        res[f"bt_{mode}_s"], res[f"bt_{mode}_insns"] = r["s"], r["insns"]
        res[f"forkwait_{mode}_s"] = r["forkwait_s"]
        res[f"forkwait_{mode}_cpu_s"] = r["forkwait_cpu_s"]
    if not args.no_qemu:
        qemu = ensure_qemu(not args.no_install)
        if qemu is None:
            print("qemu-system-x86_64 is not available: no TCG reference", flush=True)
            res["qemu_tcg_s"] = res["qemu_tcg_insns"] = None
        else:
            secs, insns = run_qemu(qemu, kernel, initrd, args.timeout)
            print(f"QEMU TCG: {fmt(secs)} s to the marker, {fmt(insns)} guest instructions", flush=True)
            res["qemu_tcg_s"], res["qemu_tcg_insns"] = secs, insns
    shadow = res.get("bt_shadow_s")
    res["goal_120s"] = "met" if isinstance(shadow, float) and shadow <= 120 else "missed"
    # CPU seconds of the VMM process when known: wall time on a shared host
    # mostly measures the neighbours
    fs, fn = res.get("forkwait_shadow_cpu_s"), res.get("forkwait_nested_cpu_s")
    if fs is None or fn is None:
        fs, fn = res.get("forkwait_shadow_s"), res.get("forkwait_nested_s")
    res["shadow_beats_nested"] = "na" if fs is None or fn is None else ("yes" if fs < fn else "no")
    print("RESULT " + " ".join(f"{k}={fmt(v)}" for k, v in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
