"""The hw engine on small guests assembled at test time: mode entries, port
I/O to the UART, HLT, MMIO exits, the debug-exit port and two vCPUs."""

import pytest

from pyvmm.cli.exitcodes import EXIT_HALTED, exit_code
from pyvmm.machine import StopReason

from .rawguest import require_kvm, run_raw, build_guest

pytestmark = pytest.mark.kvm

# Prints the NUL-terminated string at `msg` on COM1, polling LSR.THRE like a driver.
PRINT_LOOP = """
    mov $msg, %{si}
1:  mov $0x3fd, %dx
2:  in %dx, %al
    test $0x20, %al
    jz 2b
    mov (%{si}), %al
    test %al, %al
    jz 3f
    mov $0x3f8, %dx
    out %al, %dx
    inc %{si}
    jmp 1b
3:
"""


def printer(mode: str, text: str, tail: str = "hlt") -> str:
    si = {"real": "si", "prot": "esi", "long": "rsi"}[mode]
    return PRINT_LOOP.format(si=si) + f"\n{tail}\nmsg: .asciz \"{text}\"\n"


@pytest.fixture(autouse=True)
def _kvm():
    require_kvm()


@pytest.mark.parametrize("mode", ["real", "prot", "long"])
def test_entry_modes_print_and_halt(mode):
    run = run_raw(build_guest(printer(mode, f"hello from {mode} mode\\n"), mode), mode)
    assert run.output == f"hello from {mode} mode\n".encode()
    assert run.status.reason is StopReason.HALTED
    assert exit_code(run.status) == EXIT_HALTED
    stats = run.machine.engine.stats()
    assert stats["exits"]["hlt"] == 1
    assert run.machine.io_bus.stats()["serial0"]["writes"] == len(f"hello from {mode} mode\n")


def test_long_mode_state_after_run():
    code = build_guest("mov $0x1122334455667788, %rax\nmov %rax, %rbx\nshr $8, %rbx\nhlt\n", "long")
    run = run_raw(code, "long")
    assert run.state.regs["rax"] == 0x1122334455667788
    assert run.state.regs["rbx"] == 0x0011223344556677
    assert run.state.long_mode
    assert run.state.cs.l == 1


class Scratch:
    """An MMIO device that remembers writes and answers reads with them, +1."""
    def __init__(self):
        self.writes = []
        self.value = 0

    def read(self, offset, size):
        return (self.value + 1) & ((1 << (8 * size)) - 1)

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))
        self.value = value


def test_mmio_exits_reach_the_mmio_bus():
    dev = Scratch()
    code = build_guest("""
        mov $0xd0000010, %rdi
        movl $0x12345678, (%rdi)
        mov (%rdi), %eax
        movw $0xbeef, 4(%rdi)
        hlt
    """, "long")
    run = run_raw(code, "long", setup=lambda m: m.mmio_bus.insert(0xD0000000, 0x1000, dev, "scratch"))
    assert dev.writes == [(0x10, 4, 0x12345678), (0x14, 2, 0xBEEF)]
    assert run.state.regs["rax"] == 0x12345679
    assert run.machine.mmio_bus.stats()["scratch"] == {"reads": 1, "writes": 2}


def test_debug_exit_port_sets_the_exit_code():
    code = build_guest(printer("prot", "bye\\n", tail="mov $0xf4, %dx\nmov $0x2a, %al\nout %al, %dx\nhlt"), "prot")
    run = run_raw(code, "prot", irqchip=True, debug_exit=(0xF4, 4))
    assert run.output == b"bye\n"
    assert run.status.reason is StopReason.DEBUG_EXIT
    assert exit_code(run.status) == (0x2A << 1) | 1


# The BSP wakes the AP with INIT-SIPI-SIPI through the in-kernel local APIC;
# the AP starts in real mode at 0x8000, says so on the UART and bumps a counter.
AP_TRAMPOLINE = """
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov $0x3f8, %dx
    mov $'A', %al
    out %al, %dx
    lock incw 0x5000
1:  hlt
    jmp 1b
"""

BSP_WAKES_AP = """
    movl $0, 0x5000
    movl $0x1ff, 0xfee000f0          # SVR: APIC software-enabled
    movl $(1 << 24), 0xfee00310      # ICR high: destination APIC id 1
    movl $0x4500, 0xfee00300         # INIT
    mov $100000, %ecx
1:  loop 1b
    movl $0x4608, 0xfee00300         # SIPI, vector 8 -> 0x8000
    mov $100000, %ecx
2:  loop 2b
    movl $0x4608, 0xfee00300         # second SIPI, as the MP spec says
    mov $50000000, %ecx
3:  cmpw $0, 0x5000
    jne 4f
    loop 3b
4:  mov 0x5000, %eax
    mov $0x3f8, %dx
    add $'0', %al
    out %al, %dx
    mov $0xf4, %dx
    mov $0x10, %al
    out %al, %dx
    hlt
"""


def test_two_vcpus_both_run():
    from .asm import assemble
    from pathlib import Path
    ap = Path(assemble(".code16\n" + AP_TRAMPOLINE, fmt="bin", org=0x8000)).read_bytes()
    run = run_raw(build_guest(BSP_WAKES_AP, "prot"), "prot", cpus=2, irqchip=True,
                  debug_exit=(0xF4, 1), extra={0x8000: ap})
    assert run.status.reason is StopReason.DEBUG_EXIT, run.status
    assert exit_code(run.status) == (0x10 << 1) | 1
    assert run.output == b"A1"  # the AP printed, and the BSP saw one AP check in


@pytest.mark.parametrize("mode", ["real", "prot", "long"])
def test_same_output_under_bt_and_hw(mode):
    """The mode-entry guests print the same bytes and stop the same way on both engines."""
    code = build_guest(printer(mode, f"{mode}: 0123456789abcdef\\n"), mode)
    hw = run_raw(code, mode)
    bt = run_raw(code, mode, engine="bt")
    assert hw.output == bt.output == f"{mode}: 0123456789abcdef\n".encode()
    assert hw.status.reason is bt.status.reason is StopReason.HALTED
    assert hw.state.rip == bt.state.rip
    assert hw.state.regs == bt.state.regs


CR3_RELOAD_GUEST = """
    mov $0x200000, %rdi
    mov $1000, %ecx
    xor %ebx, %ebx
1:  mov %cr3, %rax
    mov %rax, %cr3                  # same value: a TLB flush, nothing else
    mov %rcx, (%rdi,%rcx,8)
    add (%rdi,%rcx,8), %rbx
    lea 0x300000, %rsi
    mov %rcx, %rdx
    mov %rdi, %r8
    push %rcx
    mov $64, %ecx
    mov %rdi, %rsi
    lea 0x300000, %rdi
    rep movsq                       # copy 512 bytes ...
    mov $0x5a, %al
    mov $32, %ecx
    rep stosb                       # ... and fill 32 more after them
    pop %rcx
    mov %r8, %rdi
    add 0x300008, %rbx              # the second copied quadword
    loop 1b
    mov 0x300200, %r9               # the filled bytes
    hlt
"""


def test_cr3_reloads_and_rep_string_ops_agree_between_engines():
    code = build_guest(CR3_RELOAD_GUEST, "long")
    hw = run_raw(code, "long")
    bt = run_raw(code, "long", engine="bt")
    assert hw.status.reason is bt.status.reason is StopReason.HALTED
    assert bt.state.regs == hw.state.regs
    assert hw.state.regs["r9"] == 0x5A5A5A5A5A5A5A5A
