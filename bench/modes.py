#!/usr/bin/env python3
"""The multi-mode comparison (issue 7): the same workloads under bt, hw,
hybrid and auto, times and ratios in one table from one run.

Linux workloads (the fitted kernel when `pyvmm kernel build` has cached
one, else the stock Debian kernel, with pyvmm's busybox initramfs), timed
on the host from typing the command to seeing its end marker:
  boot     spawn -> PYVMM-INIT-READY
  cpu      a shell arithmetic loop (user-mode CPU work)
  syscall  dd with 1-byte blocks (two system calls a block)
  fork     /bin/true started in a loop (fork + exec + exit + wait)
Assembled guests (tests/modeguests.py user_guest: a CPL3 loop with or
without a syscall per round; they run on every engine, hw included):
  raw-user     a CPL3 ALU loop, one syscall at the end
  raw-syscall  many syscalls with little user work between them

An engine that cannot run a workload on this host gets "n/a" with the
reason (on kvm_pvm, hw cannot run Linux user space: the first user-mode
`syscall` stays at CPL3).  auto runs whatever autoselect picks for the
guest and says which (for Linux, when that engine was already measured in
this run, its numbers are reused rather than booting the same thing twice).

Ends with: RESULT key=value ... (seconds; <engine>_over_hybrid ratios)."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyvmm import autoselect  # noqa: E402
from pyvmm.builder import build_machine, destroy_machine  # noqa: E402
from pyvmm.config import VmConfig  # noqa: E402
from pyvmm.guest.initramfs import READY_MARKER, ensure_default_initramfs  # noqa: E402
from pyvmm.machine import StopReason  # noqa: E402
from pyvmm.engines.bt.bootprep import kernel_args  # noqa: E402
from tests.guest_session import GuestSession  # noqa: E402
from tests.modeguests import boot_for, expected_user_result, user_guest, user_result  # noqa: E402

# Every engine boots the same command line: the parameters bt and hybrid
# append to save translated work (engines/bt/bootprep.py) are given to hw
# too, so the engines are compared on the same guest work.
_BASE = "console=ttyS0 reboot=k panic=-1"
CMDLINE = f"{_BASE} {kernel_args(_BASE)}"
ENGINES = ("bt", "hw", "hybrid", "auto")


def linux_workloads(scale: float) -> dict[str, str]:
    return {
        "cpu": f"i=0; while [ $i -lt {max(int(5000 * scale), 100)} ]; do i=$((i+1)); done",
        "syscall": f"dd if=/dev/zero of=/dev/null bs=1 count={max(int(2000 * scale), 50)} 2>/dev/null",
        "fork": f"for i in $(seq {max(int(20 * scale), 3)}); do /bin/true; done",
    }


def find_kernel() -> tuple[str, str, str | None]:
    """(label, kernel path, initrd) for the Linux workloads."""
    fitted = Path.home() / ".cache/pyvmm/kernel/build-linux-source-6.1/arch/x86/boot/bzImage"
    initrd = str(ensure_default_initramfs())
    if fitted.exists():
        return "fitted", str(fitted), initrd
    stock = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"))
    if not stock:
        raise SystemExit("modes: no kernel (install linux-image-cloud-amd64 or run `pyvmm kernel build`)")
    return "stock", str(stock[-1]), initrd


def run_linux(engine: str, kernel: str, initrd: str, cmds: dict[str, str], timeout: float) -> dict:
    """Boots once under `engine` and times each command; values are seconds
    or "n/a: reason"."""
    out: dict = {}
    args = ["run", "--engine", engine, "--kernel", kernel, "--initrd", initrd, "--append", CMDLINE,
            "--mem", "256M", "--no-reboot"]
    if engine in ("bt", "hybrid"):
        args.append("--no-bt-cache")     # first-boot translation cost, the same for both
    t0 = time.monotonic()
    with GuestSession(*args) as s:
        try:
            s.expect(READY_MARKER, timeout)
        except AssertionError:
            err = [l for l in s.errors.splitlines() if l.strip()]
            why = err[0] if err else (s.output.strip().splitlines() or ["no output"])[-1]
            reason = f"n/a: no {READY_MARKER} in {timeout:.0f} s ({why[:120]})"
            return {k: reason for k in ("boot", *cmds)}
        out["boot"] = time.monotonic() - t0
        if engine == "auto":
            out["choice"] = next((l.split("->")[1].split(":")[0].strip() for l in s.errors.splitlines()
                                  if "engine auto ->" in l), "?")
        for i, (name, cmd) in enumerate(cmds.items()):
            mark = 7000 + i
            t = time.monotonic()
            s.send(f"{cmd}; echo MODES-$((0+{mark}))\n")
            try:
                s.expect(f"MODES-{mark}\\b", timeout)
                out[name] = time.monotonic() - t
            except AssertionError:
                out[name] = f"n/a: no end marker in {timeout:.0f} s"
                break
        s.send("reboot -f\n")
        try:
            s.wait(60)
        except Exception:
            pass
    return out


def run_raw(engine: str, outer: int, uwork: int, syscalls: bool, timeout: float) -> float | str:
    """Seconds for the assembled user/kernel guest, checked against Python."""
    if engine == "auto":
        engine = autoselect.choose(None).engine
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True)
    m = build_machine(cfg, lambda b: None, boot=boot_for(user_guest(outer, uwork, 3, syscalls=syscalls)))
    timer = threading.Timer(timeout, m.request_stop, args=(StopReason.USER, "timeout"))
    timer.start()
    t0 = time.perf_counter()
    try:
        m.engine.run()
        took = time.perf_counter() - t0
        st = m.engine.save_state(0)
    finally:
        timer.cancel()
        destroy_machine(m)
    right = user_result(st.regs) == expected_user_result(outer, uwork, 3, syscalls)
    if m.stop_status.reason is StopReason.HALTED and right:
        return took
    if engine == "hw" and m.stop_status.reason is StopReason.RESET and right:
        # kvm_pvm: the closing `syscall` stays at CPL3 and its handler's hlt
        # triple-faults; the user work before it is complete and checked.
        return took
    return f"n/a: {m.stop_status.detail}" + ("" if right else ", wrong result")


def cell(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)[:44]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--scale", type=float, default=1.0, help="workload size factor (default 1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per boot or command")
    ap.add_argument("--no-linux", action="store_true", help="only the assembled guests")
    a = ap.parse_args()
    engines = [e for e in a.engines.split(",") if e]
    facts = autoselect.host_facts()
    label, kernel, initrd = find_kernel()
    print(f"host: kvm={facts.kvm_usable} hardware_assist={facts.hardware_assist} "
          f"kernel_mode_emulated={facts.kernel_mode_emulated}; Linux workloads on the {label} kernel")
    print("auto picks:", autoselect.decide(facts, autoselect.guest_facts(kernel)).line(),
          "| raw guests:", autoselect.decide(facts, autoselect.GuestFacts(linux=False)).engine)
    rows: dict[str, dict] = {}
    cmds = linux_workloads(a.scale)
    raw = {"raw-user": (4, max(int(2_000_000 * a.scale), 1000), False),
           "raw-syscall": (max(int(2000 * a.scale), 10), 20, True)}
    for e in engines:
        r: dict = {}
        if e in ("hw", "auto") or facts.kvm_usable or e == "bt":
            for name, (outer, uwork, sc) in raw.items():
                try:
                    r[name] = run_raw(e, outer, uwork, sc, a.timeout)
                except Exception as ex:   # an engine that cannot start here
                    r[name] = f"n/a: {ex}"
        if not a.no_linux:
            picked = autoselect.decide(facts, autoselect.guest_facts(kernel)).engine
            if e == "auto" and picked in rows:
                # auto boots exactly what it picked: the same run as that engine's
                r.update({k: v for k, v in rows[picked].items() if not k.startswith("raw-")})
                r["choice"] = picked
            elif e == "hw" and facts.kernel_mode_emulated:
                reason = "n/a: kvm_pvm keeps a user syscall at CPL3 (init dies)"
                r.update({k: reason for k in ("boot", *cmds)})
            else:
                r.update(run_linux(e, kernel, initrd, cmds, a.timeout))
        rows[e] = r
        print(f"{e}: " + ", ".join(f"{k}={cell(v)}" for k, v in r.items()), flush=True)
    keys = [*raw] + ([] if a.no_linux else ["boot", *cmds])
    print()
    print(f"{'workload':<12}" + "".join(f"{e:>16}" for e in engines) + "   (seconds)")
    for k in keys:
        print(f"{k:<12}" + "".join(f"{cell(rows[e].get(k, 'n/a')):>16}" for e in engines))
    result = []
    for e in engines:
        for k in keys:
            v = rows[e].get(k)
            result.append(f"{k.replace('-', '_')}_{e}_s={v:.3f}" if isinstance(v, float) else
                          f"{k.replace('-', '_')}_{e}_s=na")
    if "hybrid" in rows:
        for e in engines:
            if e == "hybrid":
                continue
            for k in keys:
                v, h = rows[e].get(k), rows["hybrid"].get(k)
                if isinstance(v, float) and isinstance(h, float) and h > 0:
                    result.append(f"{k.replace('-', '_')}_{e}_over_hybrid={v / h:.2f}")
    if "auto" in rows and "choice" in rows["auto"]:
        result.append(f"auto_linux={rows['auto']['choice']}")
    print("RESULT " + " ".join(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
