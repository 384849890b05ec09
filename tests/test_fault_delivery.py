"""Exceptions, `int n` and `syscall` raised by CPL3 code, delivered through
the guest's IDT at CPL0 with the TSS stack switch: bt against the real CPU
(hw: on every host user code runs natively under KVM).

Each case runs one faulting user instruction; the handler stub records the
vector, the error code, the return frame (RIP, CS), the handler's CS and
stack and CR2, then halts.  bt and hw must agree exactly, except where this
host's KVM (kvm_pvm) is measured to differ from the architecture: there the
test pins down what kvm_pvm does, so a change on either side is noticed."""

from __future__ import annotations

import pytest

from pyvmm.config import VmConfig
from pyvmm.engines.kvm import hostfit

from .modeguests import IDT_STUBS, KSTACK, SYSCALL_SETUP, USTACK, boot_for, enter_user, idt_setup
from .rawguest import build_guest, require_kvm, run_machine

IDT = 0x120000
SOURCE = """
.intel_syntax noprefix
""" + SYSCALL_SETUP + idt_setup(IDT) + """""" + enter_user() + """sys_entry:
    mov r15, 0x5555
    mov ax, cs
    movzx r14, ax
    hlt
common:
    mov ax, cs
    movzx r14, ax
    mov r9, [rsp]
    mov r13, [rsp+8]
    mov r12, [rsp+16]
    mov r11, [rsp+24]
    mov r10, rsp
    mov rbx, cr2
    hlt
""" + IDT_STUBS + """user:
    {what}
    jmp user
"""
USER_CODE = {
    "ud2": "ud2",
    "int3": "int3",
    "divide": "xor ecx, ecx; div ecx",
    "gp-cli": "cli",
    "page-fault": "mov rax, [0x7fff0000000]",
    "int80": "int 0x80",
    "syscall": "syscall",
}


def _delivery(engine: str, what: str) -> tuple:
    code = build_guest(SOURCE.format(ustack=USTACK, what=USER_CODE[what]), "long")
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True)
    machine, st = run_machine(cfg, boot_for(code), timeout=60)
    r = st.regs
    # vector, error code, frame RIP, frame CS, handler CS, handler RSP, CR2, syscall handler reached
    return r["r9"], r["r13"], r["r12"], r["r11"], r["r14"], r["r10"], r["rbx"], r["r15"] == 0x5555


@pytest.mark.kvm
@pytest.mark.parametrize("what,vector", [("ud2", 6), ("int3", 3), ("divide", 0), ("gp-cli", 13),
                                         ("page-fault", 14)])
def test_user_fault_delivery_matches_the_cpu(what, vector):
    require_kvm()
    bt, hw = _delivery("bt", what), _delivery("hw", what)
    assert bt == hw
    assert bt[0] == vector and bt[3] == 0x23 and bt[4] == 0x8
    assert bt[5] == KSTACK - 8 * 7              # RSP0 from the TSS, then SS, RSP, RFLAGS, CS, RIP, error, vector
    if what == "page-fault":
        assert bt[1] == 4 and bt[6] == 0x7FFF0000000   # user read of a not-present page; CR2 = address


@pytest.mark.kvm
def test_int80_from_user_mode():
    require_kvm()
    bt, hw = _delivery("bt", "int80"), _delivery("hw", "int80")
    assert bt[0] == 0x80 and bt[1] == 0          # a trap: the frame points after the instruction
    if hostfit.kernel_mode_emulated():
        assert hw[0] == 6 and hw[2] == bt[2] - 2  # measured: kvm_pvm raises #UD at the int 0x80
    else:
        assert bt == hw


@pytest.mark.kvm
def test_syscall_from_user_mode():
    require_kvm()
    bt, hw = _delivery("bt", "syscall"), _delivery("hw", "syscall")
    assert bt[7]                                 # the LSTAR handler ran (and halted at CPL0)
    if hostfit.kernel_mode_emulated():
        # measured: kvm_pvm enters LSTAR without leaving CPL3, so the handler's
        # hlt is #GP from CS 0x23 (engines/hybrid exists because of this)
        assert hw[7] and hw[0] == 13 and hw[3] == 0x23
    else:
        assert bt[:7] == hw[:7]
