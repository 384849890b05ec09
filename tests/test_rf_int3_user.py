"""An int3 that an iretq with RF=1 returns to, in user mode, under bt,
hybrid (user code under KVM) and hw (the CPU runs the user code itself).
RF only suppresses instruction breakpoints, for one instruction (SDM
Vol. 3, 18.3.1.1); int3 is no instruction breakpoint, so it must trap
(#BP, RIP after it) once, and the code after it runs on.  Under hybrid a
KVM exit with RF set reads as a fault (hybrid/engine.py, _trap_length): bt
keeps RF out of the RFLAGS KVM gets, so the int3 is not mistaken for one.

The #BP handler logs the pushed RIP and RFLAGS at BP_LOG (count in R8);
the user code then ends with ud2, whose #UD halts with 6 in RAX."""

from __future__ import annotations

import pytest

from pyvmm.config import VmConfig
from pyvmm.machine import StopReason

from .hybridguest import IDT
from .modeguests import IDT_STUBS, SYSCALL_SETUP, USTACK, boot_for, enter_user, idt_setup
from .rawguest import build_guest, require_kvm, run_machine

BP_LOG, LABEL = 0x330000, 0x331000
RF = 1 << 16

SOURCE = """
.intel_syntax noprefix
""" + SYSCALL_SETUP + idt_setup(IDT) + f"""    mov qword ptr [{LABEL}], OFFSET u_after
    xor r8, r8
    xor ebx, ebx
""" + enter_user(0x2 | RF) + f"""
sys_entry:
common:                       /* [rsp] = vector, then error code or 0, then the frame */
    cmp qword ptr [rsp], 3
    jne other
    push rax
    push rcx
    mov rcx, r8
    shl rcx, 4
    mov rax, [rsp + 32]       /* the pushed RIP */
    mov [{BP_LOG} + rcx], rax
    mov rax, [rsp + 48]       /* RFLAGS */
    mov [{BP_LOG} + rcx + 8], rax
    inc r8
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
    int3
u_after:
    inc ebx
    ud2                       /* the end: #UD halts in `other` */
"""


@pytest.mark.parametrize("engine", ["bt", "hybrid", "hw"])
def test_int3_under_rf_from_iretq_traps_once(engine):
    if engine != "bt":
        require_kvm()
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True)

    def inspect(m):
        mem = m.memory
        return mem.read_u64(LABEL), [(mem.read_u64(BP_LOG + 16 * i), mem.read_u64(BP_LOG + 16 * i + 8))
                                     for i in range(2)]
    code = build_guest(SOURCE.format(ustack=USTACK), "long")
    m, st = run_machine(cfg, boot_for(code), timeout=60, inspect=inspect)
    assert m.stop_status.reason is StopReason.HALTED, (engine, m.stop_status, hex(st.rip))
    after, log = m.inspected
    assert (st.regs["rax"], st.regs["r8"], st.regs["rbx"]) == (6, 1, 1)   # one #BP; u_after ran once
    assert log[0][0] == after
