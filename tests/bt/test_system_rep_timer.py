"""A `rep movs`/`rep stos` with a large count is interrupted by a timer
interrupt part-way (SDM Vol. 2, REP: the CPU takes interrupts between
iterations): the handler sees RCX/RSI/RDI partly advanced and the pushed
RIP on the rep instruction; after IRET the rep resumes and completes.

64-bit CPL0 guests on the bt engine (tests/bt/test_system.py's harness),
deterministic guest time, the local APIC timer one-shot at a 1 ns tick.
The guest checks itself and prints one letter per check, '-' on failure:
I  the handler ran with 0 < RCX < count (interrupted mid-way)
R  the pushed RIP is the rep instruction's
S  RDI (and RSI) in the handler agree with RCX: count - RCX elements done
Z  after the rep: RCX = 0 and RDI at the end
M  memory: first and last elements written, nothing past the end."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tests.hostfacts import require_from_setup  # noqa: E402
require_from_setup(programs=["as"], package="binutils")

from pyvmm.machine import StopReason  # noqa: E402
from tests.bt.test_system import run  # noqa: E402

SRC, DST = 0x400000, 0x800000
PUT = "mov dx, 0x3f8\nout dx, al\n"


def check(letter: str, fail_jumps: str) -> str:
    """Prints `letter`, or '-' when one of `fail_jumps` (jumps to 9f) is taken."""
    return f"{fail_jumps}\nmov al, '{letter}'\njmp 8f\n9: mov al, '-'\n8: {PUT}"


def guest(setup: str, rep: str, count: int, size: int, timer_ns: int, down: bool = False,
          movs: bool = False) -> str:
    nbytes = count * size
    first, last = (DST - nbytes + size, DST) if down else (DST, DST + nbytes - size)
    end_rdi = DST - nbytes if down else DST + nbytes
    past = DST - nbytes if down else DST + nbytes     # the first byte not to write
    step = "sub" if down else "add"
    src_agrees = (f"mov rbx, {SRC}; {step} rbx, rax; cmp r15, rbx; jne 9f" if movs else "")
    return f"""
    mov ebp, 0xfee00000
    mov dword ptr [rbp + 0xf0], 0x1ff
    mov dword ptr [rbp + 0x3e0], 0xb          /* divide by 1: a 1 ns tick */
    mov dword ptr [rbp + 0x320], 0x40         /* one-shot, vector 0x40 */
    xor r10, r10
    mov r12, -1
    lea r13, [rip + rep_at]
    {setup}
    mov ecx, {count}
    {"std" if down else "cld"}
    sti
    mov dword ptr [rbp + 0x380], {timer_ns}
rep_at:
    {rep}
    cli
    cld
    mov r8, rcx
    mov r9, rdi
    {check("I", f"test r10, r10; jz 9f; cmp r10, {count}; jae 9f")}
    {check("R", "cmp r12, r13; jne 9f")}
    {check("S", f"mov rax, {count}; sub rax, r10; imul rax, rax, {size}; mov rbx, {DST}; {step} rbx, rax; cmp r11, rbx; jne 9f; {src_agrees}")}
    {check("Z", f"test r8, r8; jnz 9f; mov rax, {end_rdi}; cmp r9, rax; jne 9f")}
    {check("M", f"mov rbx, [{first}]; cmp rbx, [rip + want_first]; jne 9f; mov rbx, [{last}]; cmp rbx, [rip + want_last]; jne 9f; cmp byte ptr [{past}], 0; jne 9f")}
    hlt
.org 0x300
    mov r10, rcx
    mov r11, rdi
    mov r15, rsi
    mov r12, [rsp]
    mov dword ptr [rbp + 0xb0], 0
    iretq
.align 8
"""


def test_rep_stosq_is_interrupted_by_the_timer_and_resumes():
    count = 0xC0000                                        # 6 MiB: ~0.8 ms of guest time
    asm = guest("mov edi, 0x800000\nmov rax, 0x5a5a5a5a5a5a5a5a", "rep stosq", count, 8, 300_000)
    asm += "want_first: .quad 0x5a5a5a5a5a5a5a5a\nwant_last: .quad 0x5a5a5a5a5a5a5a5a\n"
    out, reason, stats = run(asm, {0x40: (0x300, 0)})
    assert (out, reason) == (b"IRSZM", StopReason.HALTED)
    assert stats["interrupts_delivered"] == 1


def test_rep_movsb_is_interrupted_by_the_timer_and_resumes():
    count = 0x300000                                       # 3 MiB, byte by byte
    pattern = bytes((i * 7 + (i >> 8)) & 0xFF for i in range(count))
    asm = guest(f"mov edi, {DST:#x}\nmov esi, {SRC:#x}", "rep movsb", count, 1, 500_000, movs=True)
    asm = asm.replace(f"mov rbx, [{DST + count - 1}]", f"mov rbx, [{DST + count - 8}]")
    asm += (f"want_first: .quad {int.from_bytes(pattern[:8], 'little'):#x}\n"
            f"want_last: .quad {int.from_bytes(pattern[-8:], 'little'):#x}\n")
    out, reason, _ = run(asm, {0x40: (0x300, 0)}, extra={SRC: pattern})
    assert (out, reason) == (b"IRSZM", StopReason.HALTED)


def test_rep_stosb_going_down_element_by_element_is_interrupted_and_resumes():
    # DF=1 takes the element-by-element loop (no bulk path)
    count = 0x30000
    asm = guest(f"mov edi, {DST:#x}\nmov al, 0x33", "rep stosb", count, 1, 60_000, down=True)
    asm += "want_first: .quad 0x3333333333333333\nwant_last: .quad 0x33\n"
    # the first element (at DST) is one byte: the bytes above it were never written
    asm = asm.replace(f"mov rbx, [{DST}]; cmp rbx, [rip + want_last]",
                      f"movzx rbx, byte ptr [{DST}]; cmp rbx, [rip + want_last]")
    out, reason, _ = run(asm, {0x40: (0x300, 0)})
    assert (out, reason) == (b"IRSZM", StopReason.HALTED)
