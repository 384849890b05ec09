"""Interrupts the guest makes pending by its own action are taken at the
next instruction boundary where RFLAGS.IF allows (Intel SDM Vol. 3, 6.6 and
11.8.3), under bt: a self-IPI through the local APIC's ICR (xAPIC MMIO and
x2APIC MSR), a TPR lowered below a pending vector (APIC TPR and CR8), an
EOI that uncovers a pending vector, and IF set by STI (after its one-
instruction shadow), POPF and IRET.  Two pending vectors go highest first;
the TPR masks whole priority classes (vector >> 4 <= TPR >> 4).

Each guest runs 64-bit at CPL0 (tests/bt/test_system.py's harness) and
prints on COM1: handlers print their own letter, the main line prints a
marker after each step, so the order of the letters is the order of events.
The handler for vector V prints chr(V) and counts in EBX; `mov ecx, ebx`
right after a step shows whether the handler ran before that instruction."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tests.hostfacts import require_from_setup  # noqa: E402
require_from_setup(programs=["as"], package="binutils")

from pyvmm.machine import StopReason  # noqa: E402
from tests.bt.test_system import run  # noqa: E402

APIC = "mov esi, 0xfee00000\nmov dword ptr [rsi + 0xf0], 0x1ff\nxor ebx, ebx\n"
# Self-IPI through the ICR's "self" shorthand (bits 19:18 = 01), fixed mode.
def ipi(vector: int) -> str:
    return f"mov dword ptr [rsi + 0x300], {0x40000 | vector:#x}\n"


PUT = "mov dx, 0x3f8\nout dx, al\n"
# Prints ECX (0..9) as a digit: how many handlers had run when it was copied.
PUT_ECX = "lea eax, [ecx + 0x30]\n" + PUT
DONE = "cli\nhlt\n"


def handler(letter: str, eoi: bool = True, extra: str = "") -> str:
    return (f"push rax; push rdx\nmov al, {ord(letter)}\n{PUT}inc ebx\n{extra}"
            + ("mov dword ptr [rsi + 0xb0], 0\n" if eoi else "") + "pop rdx; pop rax\niretq\n")


def guest(main: str, handlers: dict[int, str]) -> tuple[bytes, StopReason]:
    """Runs `main` with a handler per vector, each at its own 0x100 slot."""
    asm = APIC + main + DONE
    table = {}
    for n, (vec, body) in enumerate(sorted(handlers.items())):
        asm += f".org {0x400 + 0x100 * n:#x}\n{body}"
        table[vec] = (0x400 + 0x100 * n, 0)
    out, reason, _ = run(asm, table)
    return out, reason


def test_self_ipi_is_taken_before_the_next_instruction():
    out, reason = guest("sti\n" + ipi(0x41) + "mov ecx, ebx\n" + PUT_ECX, {0x41: handler("A")})
    assert (out, reason) == (b"A1", StopReason.HALTED)


def test_self_ipi_before_a_delay_loop_is_taken_before_the_loop():
    # The loop body copies EBX each time round; the handler copies RCX (the
    # iterations left) into EDI: the CPU takes the interrupt with all 1000 left.
    main = ("sti\nmov ecx, 1000\n" + ipi(0x41)
            + "1: mov r8d, ebx\ndec ecx\njnz 1b\n"
            + "mov ecx, r8d\n" + PUT_ECX + "cmp edi, 1000\nmov al, 'y'\nje 2f\nmov al, 'n'\n2: " + PUT)
    out, reason = guest(main, {0x41: handler("A", extra="mov edi, ecx\n")})
    assert (out, reason) == (b"A1y", StopReason.HALTED)


def test_x2apic_self_ipi_msr_is_taken_before_the_next_instruction():
    main = ("mov ecx, 0x1b\nrdmsr\nor eax, 0xc00\nwrmsr\n"          # x2APIC mode
            "mov ecx, 0x80f\nmov eax, 0x1ff\nxor edx, edx\nwrmsr\n"  # SVR
            "sti\nmov ecx, 0x83f\nmov eax, 0x41\nwrmsr\nmov ecx, ebx\n" + PUT_ECX)
    x2eoi = "push rcx\nmov ecx, 0x80b\nxor eax, eax\nxor edx, edx\nwrmsr\npop rcx\n"
    out, reason = guest(main, {0x41: handler("A", eoi=False, extra=x2eoi)})
    assert (out, reason) == (b"A1", StopReason.HALTED)


def test_tpr_masks_priority_classes_and_lowering_it_delivers_highest_first():
    # TPR class 4 masks 0x41 and 0x4f (class 4) but not 0x51 (class 5).
    main = ("sti\nmov dword ptr [rsi + 0x80], 0x40\n" + ipi(0x41) + "mov al, 'a'\n" + PUT
            + ipi(0x4f) + "mov al, 'b'\n" + PUT + ipi(0x51) + "mov al, 'c'\n" + PUT
            + "mov dword ptr [rsi + 0x80], 0\nmov ecx, ebx\n" + PUT_ECX)
    out, reason = guest(main, {0x41: handler("A"), 0x4f: handler("O"), 0x51: handler("Q")})
    assert (out, reason) == (b"abQcOA3", StopReason.HALTED)


def test_cr8_is_the_tpr_priority_class():
    main = ("sti\nmov eax, 5\nmov cr8, rax\nmov eax, [rsi + 0x80]\nshr eax, 4\nadd al, 0x30\n" + PUT
            + ipi(0x51) + "mov al, 'a'\n" + PUT
            + "xor eax, eax\nmov cr8, rax\nmov ecx, ebx\n" + PUT_ECX
            + "mov dword ptr [rsi + 0x80], 0x73\nmov rax, cr8\nadd al, 0x30\n" + PUT)
    out, reason = guest(main, {0x51: handler("Q")})
    assert (out, reason) == (b"5aQ17", StopReason.HALTED)


def test_eoi_that_uncovers_a_pending_vector_delivers_it_at_once():
    # In 0x51's handler, with IF=1: 0x52 is held off by the ISR (same class)
    # until the EOI, then taken before the handler's next instruction.
    inner = ("sti\n" + ipi(0x52) + "mov al, 'x'\n" + PUT + "mov dword ptr [rsi + 0xb0], 0\n"
             "mov ecx, ebx\n" + PUT_ECX)
    out, reason = guest("sti\n" + ipi(0x51) + "mov al, 'e'\n" + PUT,
                        {0x51: handler("Q", eoi=False, extra=inner), 0x52: handler("R")})
    assert (out, reason) == (b"QxR2e", StopReason.HALTED)


def test_sti_holds_off_an_interrupt_for_exactly_one_instruction():
    main = (ipi(0x41) + "mov al, 'a'\n" + PUT + "sti\nmov ecx, ebx\nmov edi, ebx\n" + PUT_ECX
            + "mov ecx, edi\n" + PUT_ECX)
    out, reason = guest(main, {0x41: handler("A")})
    assert (out, reason) == (b"aA01", StopReason.HALTED)


def test_popf_and_iret_setting_if_deliver_before_the_next_instruction():
    main = (ipi(0x41) + "pushfq\nor qword ptr [rsp], 0x200\npopfq\nmov ecx, ebx\n" + PUT_ECX
            + "cli\n" + ipi(0x42) + "mov rax, rsp\npush 0x10\npush rax\npushfq\n"
            "or qword ptr [rsp], 0x200\npush 0x08\nlea rax, [rip + 1f]\npush rax\niretq\n"
            "1: mov ecx, ebx\n" + PUT_ECX)
    out, reason = guest(main, {0x41: handler("A"), 0x42: handler("B")})
    assert (out, reason) == (b"A1B2", StopReason.HALTED)
