"""Instructions the host's KVM may fail to emulate in guest kernel mode
(kvm_pvm: lock cmpxchg16b, int3, SSE, popcnt, xsave/xrstor), run at CPL0 by
small guests under hw, where pyvmm completes them, and checked against the
values the architecture defines and against the bt engine."""

import pytest

from pyvmm.engines.kvm import hostfit
from pyvmm.machine import StopReason

from .rawguest import build_guest, require_kvm, run_raw

pytestmark = pytest.mark.kvm

# An IDT with a #BP gate, then the instructions under test; results in
# registers, checked below. Runs in 64-bit mode at CPL0 from pyvmm's
# identity-mapped long-mode entry.
CPL0_GUEST = """
    lea idt(%rip), %rdi
    lea bp_handler(%rip), %rax
    mov %ax, 3*16(%rdi)
    movw $0x10, 3*16+2(%rdi)
    movw $0x8e00, 3*16+4(%rdi)
    shr $16, %rax
    mov %ax, 3*16+6(%rdi)
    shr $16, %rax
    mov %eax, 3*16+8(%rdi)
    lidt idtr(%rip)
    xor %r15, %r15
    int3                            # -> bp_handler: r15 += 1
    int3
    lea data(%rip), %rsi
    movq $1, (%rsi)
    movq $2, 8(%rsi)
    mov $1, %rax
    mov $2, %rdx
    mov $3, %rbx
    mov $4, %rcx
    lock cmpxchg16b (%rsi)          # equal: memory := rcx:rbx, ZF=1
    setz %r8b
    lock cmpxchg16b (%rsi)          # not equal: rdx:rax := memory, ZF=0
    setz %r9b
    mov %cr4, %r10
    or $0x600, %r10                 # OSFXSR | OSXMMEXCPT: SSE allowed
    mov %r10, %cr4
    mov $5, %r11
    movq %r11, %xmm0
    paddq %xmm0, %xmm0
    pxor %xmm1, %xmm1
    paddq %xmm0, %xmm1
    movq %xmm1, %r12                # 10
    mov $0xff00ff, %r13
    popcnt %r13, %r13               # 16
    mov 8(%rsi), %r14               # 4
    hlt
bp_handler:
    inc %r15
    iretq
.balign 16
data: .quad 0, 0
idtr: .word 256*16-1
      .quad idt
.balign 16
idt: .fill 256*16, 1, 0
"""

EXPECTED = {"r15": 2, "r8": 1, "r9": 0, "rax": 3, "rdx": 4, "rbx": 3, "rcx": 4, "r12": 10, "r13": 16, "r14": 4}

XSAVE_GUEST = """
    mov %cr4, %rax
    or $(0x600 | 0x40000), %rax     # OSFXSR, OSXMMEXCPT, OSXSAVE
    mov %rax, %cr4
    xor %ecx, %ecx
    mov $3, %eax                    # XCR0 = x87 | SSE
    xor %edx, %edx
    xsetbv
    mov $12345, %rbx
    movq %rbx, %xmm1
    lea area(%rip), %rdi
    mov $3, %eax
    xor %edx, %edx
    xsave (%rdi)
    pxor %xmm1, %xmm1
    xrstor (%rdi)
    movq %xmm1, %r14                # 12345 again
    mov 512(%rdi), %r13             # XSTATE_BV: SSE state saved (bit 1)
    hlt
.balign 64
area: .fill 1024, 1, 0
"""


@pytest.fixture(autouse=True)
def _kvm():
    require_kvm()


def _regs(run):
    return {k: run.state.regs[k] for k in EXPECTED}


def test_cpl0_instructions_complete_under_hw():
    run = run_raw(build_guest(CPL0_GUEST, "long"), "long")
    assert run.status.reason is StopReason.HALTED, run.status
    assert _regs(run) == EXPECTED
    done = run.machine.engine.stats()["completions"]
    if hostfit.kernel_mode_emulated():
        # The host's emulator gave up on these; pyvmm completed each one.
        assert done.get("cmpxchg16b") == 2
        assert done.get("int3") == 2


def test_cpl0_instructions_same_under_bt():
    hw = run_raw(build_guest(CPL0_GUEST, "long"), "long")
    bt = run_raw(build_guest(CPL0_GUEST, "long"), "long", engine="bt")
    assert bt.status.reason is StopReason.HALTED, bt.status
    assert _regs(bt) == _regs(hw) == EXPECTED
    assert bt.state.rip == hw.state.rip


def test_xsave_family_completes_against_kvm_fpu_state():
    run = run_raw(build_guest(XSAVE_GUEST, "long"), "long")
    assert run.status.reason is StopReason.HALTED, run.status
    assert run.state.regs["r14"] == 12345
    assert run.state.regs["r13"] & 2
