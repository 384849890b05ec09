#!/usr/bin/env python3
"""Guest instructions per second under the bt engine.

Five 64-bit guests (assembled with GNU as, run at CPL0 through
build_machine with a raw boot): an integer loop, a memory loop, call-heavy
code, string instructions and a loop of privileged instructions (cli/sti,
mov from CR0/CR3/CR4, mov to CR3 of the same value, pushf/popf). Each runs

  - translated: the bt engine's own run loop (translation cache, chaining);
  - interpreted: BtCpu.step(single=True) one instruction at a time
    (a shorter loop, the rate is what counts);
  - the privileged loop also under --engine hw (KVM; on this host the host
    kernel emulates guest CPL0 code), in the same run.

Instruction counts are exact: each guest's loop count and body length are
known (a rep-prefixed instruction counts once, as hardware's
instructions-retired does); the count bt reports is printed beside them.
The mix rate is total instructions / total time over the five guests.
An AVX2 row (bench/avx2_loop.py) runs a gcc -O2 -march=x86-64-v3 loop
under bt and natively, the same repetitions in the same run; it is not
part of the mix.
Goals: >= 10 M insn/s on the mix (CPython 3.11), cpl0 >= 2x hw.
Ends with: RESULT bt_mips=<mix M/s> cpl0_vs_hw=<ratio> ..."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyvmm.builder import build_machine, destroy_machine  # noqa: E402
from pyvmm.config import VmConfig  # noqa: E402
from tests.rawguest import build_guest, raw_boot  # noqa: E402

DATA = 0x200000


@dataclass
class Workload:
    name: str
    setup: str      # instructions before the loop (counted in `pre`)
    body: str       # the loop body, ending with `dec %ecx; jnz 1b`
    pre: int        # instructions in setup, the loop excluded
    per_iter: int   # instructions per iteration
    tail: str = ""  # out-of-line code (functions)

    def source(self, n: int) -> str:
        return (f"{self.setup}\n mov ${n}, %ecx\n1:\n{self.body}\n dec %ecx\n jnz 1b\n cli\n hlt\n{self.tail}\n")

    def count(self, n: int) -> int:
        """Instructions executed: setup, the mov to ecx, n bodies, cli and hlt."""
        return self.pre + 1 + n * self.per_iter + 2


WORKLOADS = [
    Workload("int", " xor %eax, %eax\n mov $1, %ebx", """
 add %rcx, %rax
 xor %rax, %rbx
 lea 3(%rbx,%rax,2), %rdx
 imul $7, %rdx, %rsi
 sub %rsi, %rax
 shr $3, %rbx
 or %rdx, %rbx""", 2, 9),
    Workload("mem", f" mov ${DATA:#x}, %rdi\n xor %eax, %eax", """
 mov %ecx, %edx
 and $511, %edx
 mov (%rdi,%rdx,8), %rax
 add %rcx, %rax
 mov %rax, (%rdi,%rdx,8)
 add %rax, 4096(%rdi)
 movzbl 4100(%rdi), %esi""", 2, 9),
    Workload("call", " xor %eax, %eax", """
 call 2f
 call 3f""", 1, 13, tail="""
2: add %rcx, %rax
 ret
3: push %rbx
 lea 1(%rax), %rbx
 call 2b
 pop %rbx
 ret"""),
    Workload("string", " cld", f"""
 mov ${DATA:#x}, %rsi
 mov ${DATA + 0x1000:#x}, %rdi
 movsq
 movsb
 lodsq
 stosq
 cmpsb
 scasw
 push %rcx
 mov $4, %ecx
 rep movsq
 pop %rcx""", 1, 14),
    Workload("cpl0", " xor %eax, %eax", """
 cli
 mov %cr0, %rax
 mov %cr4, %rdx
 sti
 pushfq
 popfq
 mov %cr3, %rbx
 mov %rbx, %cr3
 add %rax, %rdx""", 1, 11),
]


def _machine(code: bytes, engine: str):
    cfg = VmConfig(mem_mib=64, cpus=1, engine=engine, irqchip=False, no_reboot=True)
    return build_machine(cfg, lambda b: None, boot=raw_boot(code, "long"))


def _check_halted(m, what: str) -> None:
    st = m.stop_status
    if st is None or st.reason.name != "HALTED":
        raise SystemExit(f"{what}: guest did not halt cleanly: {st}")


def run_translated(w: Workload, n: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, instructions bt counted) for the engine's run loop."""
    m = _machine(build_guest(w.source(n), "long"), "bt")
    try:
        t, c = time.perf_counter(), time.process_time()
        m.engine.run()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        _check_halted(m, f"bt {w.name}")
        return dt, dc, m.engine.stats().get("instructions", -1)
    finally:
        destroy_machine(m)


def run_interpreted(w: Workload, n: int) -> float:
    """Seconds for step(single=True) over the whole guest."""
    m = _machine(build_guest(w.source(n), "long"), "bt")
    try:
        cpu = m.engine.cpus[0]
        step = cpu.step
        expected = w.count(n)
        t = time.perf_counter()
        for _ in range(expected):
            step(True)
            if cpu.halted:
                break
        dt = time.perf_counter() - t
        if not cpu.halted:
            raise SystemExit(f"interpreted {w.name}: not halted after {expected} steps (rip={cpu.rip:#x})")
        return dt
    finally:
        destroy_machine(m)


def run_hw(w: Workload, n: int) -> float:
    m = _machine(build_guest(w.source(n), "long"), "hw")
    try:
        t = time.perf_counter()
        m.engine.run()
        dt = time.perf_counter() - t
        _check_halted(m, f"hw {w.name}")
        return dt
    finally:
        destroy_machine(m)


def run_avx2(reps: int) -> str:
    """The AVX2 row (bench/avx2_loop.py): the same gcc -O2 -march=x86-64-v3
    loop natively and under bt; returns its RESULT fields."""
    import avx2_loop
    with avx2_loop.workdir() as d:
        kernel, native = avx2_loop.build(d)
        m = _machine(build_guest(avx2_loop.guest_source(kernel, DATA, reps), "long"), "bt")
        try:
            t = time.perf_counter()
            m.engine.run()
            dt = time.perf_counter() - t
            _check_halted(m, "bt avx2")
            counted = m.engine.stats().get("instructions", -1)
        finally:
            destroy_machine(m)
        dn = min(avx2_loop.run_native(native, reps) for _ in range(3))
    print(f"avx2     {counted:>10} (bt count) {counted / dt / 1e6:>9.3f} M/s under bt; native {dn * 1e6:.1f} us "
          f"for the same {reps} reps: bt/native time = {dt / dn:.0f}x")
    return f" avx2={counted / dt / 1e6:.3f} avx2_bt_vs_native_time={dt / dn:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200_000, help="loop iterations per translated guest")
    ap.add_argument("--interp-div", type=int, default=20, help="interpreted runs do iters/this")
    ap.add_argument("--no-hw", action="store_true", help="skip the KVM comparison")
    ap.add_argument("--avx2-reps", type=int, default=100, help="repetitions of the AVX2 loop (0: skip its row)")
    args = ap.parse_args(argv)
    n, ni = args.iters, max(args.iters // args.interp_div, 1)
    hw_ok = not args.no_hw and os.access("/dev/kvm", os.R_OK | os.W_OK)
    total_i = total_t = total_c = 0.0
    results: dict[str, float] = {}
    print(f"{'guest':8} {'insns':>10} {'bt-count':>10} {'translated':>12} {'interpreted':>12} {'speedup':>8}")
    for w in WORKLOADS:
        count = w.count(n)
        dt, dc, counted = run_translated(w, n)
        total_c += dc
        di = run_interpreted(w, ni)
        rate, irate = count / dt, w.count(ni) / di
        results[w.name] = rate
        total_i += count
        total_t += dt
        print(f"{w.name:8} {count:>10} {counted:>10} {rate / 1e6:>9.2f} M/s {irate / 1e6:>9.2f} M/s "
              f"{rate / irate:>7.1f}x", flush=True)
    mix = total_i / total_t
    hw_rate = ratio = float("nan")
    if hw_ok:
        cpl0 = WORKLOADS[-1]
        hw_rate = cpl0.count(n) / run_hw(cpl0, n)
        ratio = results["cpl0"] / hw_rate
        print(f"cpl0 under hw (KVM, host-emulated CPL0): {hw_rate / 1e6:.2f} M/s; bt/hw = {ratio:.2f}")
    else:
        print("hw engine skipped (/dev/kvm unusable or --no-hw)")
    print(f"mix (all five guests, translated): {mix / 1e6:.2f} M insn/s wall-clock, "
          f"{total_i / total_c / 1e6:.2f} M insn/s of process CPU time (a loaded host lowers the first)")
    avx2 = run_avx2(args.avx2_reps) if args.avx2_reps else ""
    print(f"RESULT bt_mips={mix / 1e6:.2f} cpl0_vs_hw={ratio:.2f} bt_mips_cpu={total_i / total_c / 1e6:.2f} "
          + " ".join(f"{k}={v / 1e6:.2f}" for k, v in results.items())
          + f" hw_cpl0={hw_rate / 1e6:.2f}" + avx2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
