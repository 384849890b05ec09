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

from .modeguests import KSTACK, USTACK, boot_for
from .rawguest import build_guest, require_kvm, run_machine

IDT = 0x120000
SOURCE = """
.intel_syntax noprefix
    mov ecx, 0xc0000080; rdmsr; or eax, 1; wrmsr
    mov ecx, 0xc0000081; xor eax, eax; mov edx, 0x00100008; wrmsr
    mov ecx, 0xc0000082; mov eax, OFFSET sys_entry; xor edx, edx; wrmsr
    mov ecx, 0xc0000084; mov eax, 0x200; xor edx, edx; wrmsr
    /* build IDT: every vector -> handler with vector pushed via stub table */
    mov edi, {idt}
    mov esi, OFFSET stubs
    xor ecx, ecx
1:  mov eax, esi
    mov word ptr [rdi], ax
    mov word ptr [rdi+2], 8
    mov byte ptr [rdi+4], 0
    mov byte ptr [rdi+5], 0xEE
    shr eax, 16
    mov word ptr [rdi+6], ax
    mov dword ptr [rdi+8], 0
    mov dword ptr [rdi+12], 0
    add rdi, 16
    add esi, 16
    inc ecx
    cmp ecx, 256
    jne 1b
    sub rsp, 16
    mov word ptr [rsp], 4095
    mov qword ptr [rsp+2], {idt}
    lidt [rsp]
    push 0x1b
    push {ustack}
    push 0x2
    push 0x23
    push OFFSET user
    iretq
sys_entry:
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
.align 16
stubs:
.set i, 0
.rept 256
  .if i == 8 || (i >= 10 && i <= 14) || i == 17
    push i
  .else
    push 0
    push i
  .endif
    jmp common
    .align 16
.set i, i+1
.endr
user:
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
    code = build_guest(SOURCE.format(idt=IDT, ustack=USTACK, what=USER_CODE[what]), "long")
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True)
    machine, st = run_machine(cfg, boot_for(code), timeout=60)
    r = st.regs
    # vector, error code, frame RIP, frame CS, handler CS, handler RSP, CR2, syscall handler reached
    return r["r9"], r["r13"], r["r12"], r["r11"], r["r14"], r["r10"], r["rbx"], r["r15"] == 0x5555


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


def test_int80_from_user_mode():
    require_kvm()
    bt, hw = _delivery("bt", "int80"), _delivery("hw", "int80")
    assert bt[0] == 0x80 and bt[1] == 0          # a trap: the frame points after the instruction
    if hostfit.kernel_mode_emulated():
        assert hw[0] == 6 and hw[2] == bt[2] - 2  # measured: kvm_pvm raises #UD at the int 0x80
    else:
        assert bt == hw


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
