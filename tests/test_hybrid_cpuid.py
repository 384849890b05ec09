"""One virtual CPU per VM under hybrid: user code (run by KVM on the host
CPU) reads the same CPUID as the kernel (run by bt) — vendor, family,
features and brand — not the host's (issue 14: on an AMD host user code
read AuthenticAMD while the kernel saw GenuineIntel).

The guest's user half executes CPUID for a set of leaves and stores the
answers, makes a system call, and the kernel half stores its own answers
for the same leaves."""

from __future__ import annotations

import struct

import pytest

from pyvmm.cli.exitcodes import exit_code
from pyvmm.config import VmConfig

from .modeguests import DATA, SYSCALL_SETUP, USTACK, boot_for, enter_user
from .rawguest import build_guest, require_kvm, run_machine

LEAVES = [(0, 0), (1, 0), (7, 0), (0xD, 0), (0x80000000, 0), (0x80000001, 0),
          (0x80000002, 0), (0x80000003, 0), (0x80000004, 0)]
USER_OUT, KERNEL_OUT = DATA, DATA + 0x400


def _cpuid_loop(out: int) -> str:
    """CPUID for each (leaf, subleaf) of LEAVES, 16 bytes of answer each at `out`."""
    lines = [f"    mov edi, {out:#x}"]
    for leaf, sub in LEAVES:
        lines.append(f"    mov eax, {leaf:#x}; mov ecx, {sub:#x}; cpuid\n"
                     "    mov [rdi], eax; mov [rdi+4], ebx; mov [rdi+8], ecx; mov [rdi+12], edx; add rdi, 16")
    return "\n".join(lines) + "\n"


SOURCE = """
.intel_syntax noprefix
""" + SYSCALL_SETUP + enter_user() + "sys_entry:\n" + _cpuid_loop(KERNEL_OUT) + """    cli
    hlt
user:
""" + _cpuid_loop(USER_OUT) + """    syscall
"""


def _answers(engine: str) -> tuple[list, list]:
    code = build_guest(SOURCE.format(ustack=USTACK), "long")
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True)
    size = 16 * len(LEAVES)
    machine, _ = run_machine(cfg, boot_for(code), timeout=120,
                             inspect=lambda m: (m.memory.read(USER_OUT, size), m.memory.read(KERNEL_OUT, size)))
    assert exit_code(machine.stop_status) == 4, f"{engine}: the guest did not finish: {machine.stop_status}"
    user, kernel = machine.inspected
    split = lambda raw: [struct.unpack_from("<4I", raw, 16 * i) for i in range(len(LEAVES))]  # noqa: E731
    return split(user), split(kernel)


def _vendor(answer: tuple) -> bytes:
    return struct.pack("<3I", answer[1], answer[3], answer[2])


@pytest.mark.kvm
def test_user_code_reads_the_kernels_cpu_under_hybrid():
    require_kvm()
    user, kernel = _answers("hybrid")
    diffs = [(hex(leaf), u, k) for (leaf, _), u, k in zip(LEAVES, user, kernel) if u != k]
    assert not diffs, f"user and kernel CPUID differ: {diffs}"
    assert _vendor(user[0]) == b"GenuineIntel"      # bt's table, whatever the host's vendor
