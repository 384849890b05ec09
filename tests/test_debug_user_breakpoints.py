"""Data breakpoints that user code (CPL3) hits, around `mov ss`, under bt,
hybrid and hw.  The guest kernel arms DR0/DR1 and DR7; the #DB handler logs
the pushed RIP and DR6.B0-B3/BS of each #DB (count in R8) and returns with
RF set.  SDM Vol. 3, 6.8.3: the #DB for a read breakpoint that `mov ss`
itself hits is held to the end of the next instruction, and then reports
that instruction's breakpoints too, in one #DB.

Under hybrid, user code runs in bt while DR7 arms a breakpoint (KVM is not
given the guest's debug registers)."""

from __future__ import annotations

import pytest

from pyvmm.config import VmConfig
from pyvmm.machine import StopReason

from .hybridguest import IDT
from .modeguests import IDT_STUBS, SYSCALL_SETUP, USTACK, boot_for, enter_user, idt_setup
from .rawguest import build_guest, require_kvm, run_machine

VAR, LOG, LABELS = 0x340000, 0x330000, 0x331000


def dr7(n: int, rw: int, length_code: int) -> int:
    return (1 << (2 * n)) | rw << (16 + 4 * n) | length_code << (18 + 4 * n)


SOURCE = """
.intel_syntax noprefix
""" + SYSCALL_SETUP + idt_setup(IDT) + """    mov qword ptr [{labels}], OFFSET u_mid
    mov qword ptr [{labels} + 8], OFFSET u_end
    mov qword ptr [{var}], 0x1b
    mov eax, {var}
    mov dr0, rax
    add eax, 8
    mov dr1, rax
    mov eax, {dr7:#x}
    mov dr7, rax
    xor r8, r8
""" + enter_user() + """
sys_entry:
common:                       /* [rsp] = vector, then error code or 0, then the frame */
    cmp qword ptr [rsp], 1
    jne other
    push rax
    push rcx
    mov rcx, r8
    shl rcx, 4
    mov rax, [rsp + 32]       /* the pushed RIP */
    mov [{log} + rcx], rax
    mov rax, dr6
    and eax, 0x400f
    mov [{log} + rcx + 8], rax
    mov eax, 0xffff0ff0
    mov dr6, rax
    inc r8
    or qword ptr [rsp + 48], 0x10000
    pop rcx
    pop rax
    add rsp, 16
    iretq
other:
    mov rax, [rsp]
    cli
    hlt

""" + IDT_STUBS + """
user:
    {first}
u_mid:
    {second}
u_end:
    ud2                       /* the end: #UD halts with 6 in RAX */
"""

# case: (DR7, first, second, wanted #DBs as (label, DR6 bits))
CASES = {
    # sanity: a write breakpoint traps after the write
    "write": (dr7(0, 1, 3), f"mov dword ptr [{VAR}], 0x1b", "nop", [("u_mid", 1)]),
    # a read/write breakpoint hit by mov ss: held to the end of the next instruction
    "mov-ss": (dr7(0, 3, 1), f"mov ss, [{VAR}]", "nop", [("u_end", 1)]),
    # ... and reported with the write breakpoint that instruction hits, in one #DB
    "mov-ss-then-write": (dr7(0, 3, 1) | dr7(1, 1, 3), f"mov ss, [{VAR}]", f"mov dword ptr [{VAR + 8}], 1",
                          [("u_end", 3)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("engine", ["bt", "hybrid"])
def test_user_data_breakpoints_around_mov_ss(engine, case):
    if engine != "bt":
        require_kvm()
    dr7_value, first, second, want = CASES[case]
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True)

    def inspect(m):
        mem = m.memory
        labels = {"u_mid": mem.read_u64(LABELS), "u_end": mem.read_u64(LABELS + 8)}
        return labels, [(mem.read_u64(LOG + 16 * i), mem.read_u64(LOG + 16 * i + 8)) for i in range(3)]
    code = build_guest(SOURCE.format(labels=LABELS, var=VAR, dr7=dr7_value, log=LOG, ustack=USTACK,
                                     first=first, second=second), "long")
    m, st = run_machine(cfg, boot_for(code), timeout=60, inspect=inspect)
    assert m.stop_status.reason is StopReason.HALTED, (engine, m.stop_status, hex(st.rip))
    labels, log = m.inspected
    assert st.regs["rax"] == 6                       # ended at the ud2, not on another vector
    assert log[:st.regs["r8"]] == [(labels[name], bits) for name, bits in want]
