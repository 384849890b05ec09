#!/usr/bin/env python3
"""I/O-exit round trips per second: pyvmm's hw engine (exit loop + bus
dispatch to a device) against a bare KVM_RUN loop on the same guest, same run.

The guest executes `out %al, $0x80` N times and halts. Goal: pyvmm reaches
at least 90 % of the bare loop's rate.
Ends with: RESULT exits_per_s=<pyvmm> raw_exits_per_s=<bare> ratio=<pyvmm/bare>"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyvmm.boot import entry  # noqa: E402
from pyvmm.boot.result import BootResult  # noqa: E402
from pyvmm.builder import build_machine, destroy_machine  # noqa: E402
from pyvmm.config import VmConfig  # noqa: E402
from pyvmm.engines.kvm import abi  # noqa: E402
from pyvmm.engines.kvm.device import _ioctl  # noqa: E402

# mov $N, %ecx ; 1: out %al, $0x80 ; dec %ecx ; jnz 1b ; hlt   (32-bit code)
def guest_code(n: int) -> bytes:
    return b"\xb9" + n.to_bytes(4, "little") + b"\xe6\x80\x49\x75\xfb\xf4"


def boot(n: int):
    def load(memory):
        memory.write(0x100000, guest_code(n))
        return BootResult(entry.protected_mode_32(memory, 0x100000), "raw-prot")
    return load


def machine_for(n: int):
    cfg = VmConfig(mem_mib=32, irqchip=False, no_reboot=True)
    return build_machine(cfg, lambda b: None, boot=boot(n))


def run_pyvmm(n: int) -> float:
    m = machine_for(n)
    try:
        t = time.perf_counter()
        m.engine.run()
        dt = time.perf_counter() - t
        assert m.devices and m.io_bus.stats()["post"]["writes"] == n, m.io_bus.stats()
    finally:
        destroy_machine(m)
    return n / dt


def run_raw(n: int) -> float:
    """The least a Python VMM can do per exit: KVM_RUN and read the reason."""
    m = machine_for(n)
    try:
        vcpu = m.engine.vcpus[0]
        fd, mm = vcpu.fd, vcpu.run_mm
        exits = 0
        t = time.perf_counter()
        while True:
            if _ioctl(fd, abi.RUN, None) < 0:
                raise OSError(ctypes.get_errno(), "KVM_RUN")
            if mm[abi.RUN_EXIT_REASON] != abi.EXIT_IO:
                break
            exits += 1
        dt = time.perf_counter() - t
        assert exits == n, exits
    finally:
        destroy_machine(m)
    return n / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench: /dev/kvm not usable; nothing to measure", file=sys.stderr)
        return 1
    raw, ours = [], []
    for i in range(args.rounds):  # interleaved, best of each, to damp host noise
        raw.append(run_raw(args.exits))
        ours.append(run_pyvmm(args.exits))
        print(f"round {i}: bare {raw[-1]:,.0f}/s  pyvmm {ours[-1]:,.0f}/s", file=sys.stderr)
    best_raw, best_ours = max(raw), max(ours)
    print(f"bare KVM_RUN loop : {best_raw:,.0f} exits/s ({1e6 / best_raw:.2f} us each)")
    print(f"pyvmm hw dispatch : {best_ours:,.0f} exits/s ({1e6 / best_ours:.2f} us each)")
    print(f"RESULT exits_per_s={best_ours:.0f} raw_exits_per_s={best_raw:.0f} ratio={best_ours / best_raw:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
