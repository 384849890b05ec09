"""DR0-DR3 hardware breakpoints, DR6 and DR7 under bt, held to the SDM
(Vol. 3, 18.2-18.3): execute breakpoints are faults taken before the
instruction (RF set by the handler lets it run), data write and read/write
breakpoints are traps after it (LEN 1/2/4/8, the address aligned down),
I/O breakpoints need CR4.DE, DR6.B0-B3/BS/BD say what happened, DR7.GD
makes a MOV DR fault.  A 64-bit CPL0 guest (tests/bt/test_system.py's
harness); the #DB handler records DR6, a count and the pushed RIP, and the
guest prints one letter per probe ('-' when a probe went wrong).

The real CPU cannot be the reference here: DR7 is privileged, and under
kvm_pvm the guest's user mode cannot set debug registers."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tests.hostfacts import require_from_setup  # noqa: E402
require_from_setup(programs=["as"], package="binutils")

from pyvmm.machine import StopReason  # noqa: E402
from tests.bt.test_system import run  # noqa: E402

VAR = 0x200000            # the watched data
BS, BD = 1 << 14, 1 << 13
LEN = {1: 0, 2: 1, 8: 2, 4: 3}
PUT = "mov dx, 0x3f8\nout dx, al\n"


def dr7(n: int, rw: int, length: int = 1, gd: bool = False) -> int:
    return (1 << (2 * n)) | rw << (16 + 4 * n) | LEN[length] << (18 + 4 * n) | (1 << 13 if gd else 0)


# (letter, set-up, probed instructions, hits, DR6 bits wanted, RIP wanted: "at" or "end")
PROBES = [
    # execute breakpoint on the probed instruction: a fault, RIP on it; RF lets it run once
    ("X", f"lea rax, [rip + {{at}}]\nmov dr0, rax\nmov eax, {dr7(0, 0):#x}\nmov dr7, rax", "nop", 1, 1, "at"),
    # execute breakpoint elsewhere: nothing
    ("x", f"lea rax, [rip + {{end}}]\nadd rax, 7\nmov dr0, rax\nmov eax, {dr7(0, 0):#x}\nmov dr7, rax",
     "nop", 0, 0, "none"),
    # write breakpoint, 4 bytes: a 2-byte write inside it traps after the instruction
    ("W", f"mov eax, {VAR}\nmov dr1, rax\nmov eax, {dr7(1, 1, 4):#x}\nmov dr7, rax",
     f"mov word ptr [{VAR + 2}], 0x1234", 1, 2, "end"),
    # ... a write just past it does not; a read of it does not (R/W = 01)
    ("w", f"mov eax, {VAR}\nmov dr1, rax\nmov eax, {dr7(1, 1, 4):#x}\nmov dr7, rax",
     f"mov byte ptr [{VAR + 4}], 1\nmov eax, [{VAR}]", 0, 0, "none"),
    # read/write breakpoint: a read traps
    ("R", f"mov eax, {VAR + 8}\nmov dr2, rax\nmov eax, {dr7(2, 3, 8):#x}\nmov dr7, rax",
     f"mov rcx, [{VAR + 12}]", 1, 4, "end"),
    # LEN 2 at an odd address is aligned down: a byte write at the even one hits
    ("A", f"mov eax, {VAR + 17}\nmov dr3, rax\nmov eax, {dr7(3, 1, 2):#x}\nmov dr7, rax",
     f"mov byte ptr [{VAR + 16}], 1", 1, 8, "end"),
    # a push writes the stack: a write breakpoint on the slot below RSP
    ("P", f"lea rax, [rsp - 8]\nmov dr0, rax\nmov eax, {dr7(0, 1, 8):#x}\nmov dr7, rax",
     "push rbx\npop rbx", 1, 1, "push"),
    # I/O breakpoint: only with CR4.DE
    ("I", f"mov rax, cr4\nor eax, 8\nmov cr4, rax\nmov eax, 0x80\nmov dr3, rax\nmov eax, {dr7(3, 2):#x}\nmov dr7, rax",
     "out 0x80, al", 1, 8, "end"),
    # two breakpoints on one write: both bits
    ("B", f"mov eax, {VAR}\nmov dr0, rax\nmov dr1, rax\nmov eax, {dr7(0, 1, 8) | dr7(1, 3, 1):#x}\nmov dr7, rax",
     f"mov qword ptr [{VAR}], 5", 1, 3, "end"),
    # TF and a data breakpoint on the same instruction: one #DB with BS and B1
    ("T", f"mov eax, {VAR}\nmov dr1, rax\nmov eax, {dr7(1, 1, 4):#x}\nmov dr7, rax\npushfq\nor qword ptr [rsp], 0x100",
     f"popfq\nmov dword ptr [{VAR}], 7", 1, 2 | BS, "end"),
    # SDM Vol. 3, 6.8.3: a read breakpoint that mov ss itself hits waits for
    # the end of the next instruction (RIP after it)
    ("S", f"mov word ptr [{VAR}], 0x10\nmov eax, {VAR}\nmov dr0, rax\nmov eax, {dr7(0, 3, 2):#x}\nmov dr7, rax",
     f"mov ss, [{VAR}]\nnop", 1, 1, "end"),
    # ... and one #DB reports it with the write breakpoint the next instruction hits
    ("s", f"mov word ptr [{VAR}], 0x10\nmov eax, {VAR}\nmov dr0, rax\nadd eax, 8\nmov dr1, rax\n"
          f"mov eax, {dr7(0, 3, 2) | dr7(1, 1, 4):#x}\nmov dr7, rax",
     f"mov ss, [{VAR}]\nmov dword ptr [{VAR + 8}], 1", 1, 3, "end"),
    # ... and with the single step TF asks for, held the same way (popfq sets TF: no step after it)
    ("Z", f"mov word ptr [{VAR}], 0x10\nmov eax, {VAR}\nmov dr0, rax\nmov eax, {dr7(0, 3, 2):#x}\nmov dr7, rax\n"
          "pushfq\nor qword ptr [rsp], 0x100",
     f"popfq\nmov ss, [{VAR}]\nnop", 1, 1 | BS, "end"),
    # ... after an INT n it comes at the handler's first instruction
    ("N", f"mov word ptr [{VAR}], 0x10\nmov eax, {VAR}\nmov dr0, rax\nmov eax, {dr7(0, 3, 2):#x}\nmov dr7, rax",
     f"mov ss, [{VAR}]\nint 0x40", 1, 1, "int"),
    # ... and a fault of the next instruction drops it (#UD: the handler skips the ud2)
    ("U", f"mov word ptr [{VAR}], 0x10\nmov eax, {VAR}\nmov dr0, rax\nmov eax, {dr7(0, 3, 2):#x}\nmov dr7, rax",
     f"mov ss, [{VAR}]\nud2", 0, 0, "none"),
    # general detect: MOV DR faults with BD, before it runs
    ("G", f"mov eax, {dr7(0, 1) | 1 << 13:#x}\nmov dr7, rax", "mov rax, dr0", 1, BD, "at"),
]


def guest() -> str:
    body = ""
    for i, (letter, setup, probe, hits, bits, where) in enumerate(PROBES):
        at, end = f"p{i}_at", f"p{i}_end"
        want_rip = {"at": at, "end": end, "none": end, "push": f"p{i}_push", "int": "int_40"}[where]
        if where == "push":
            probe = probe.replace("push rbx\n", f"push rbx\np{i}_push:\n")
        body += f"""
    xor r9, r9
    xor r8, r8
    mov r10, -1
    {setup.format(at=at, end=end)}
    lea r11, [rip + {want_rip}]
{at}:
    {probe}
{end}:
    xor eax, eax
    mov dr7, rax
    mov rax, cr4
    and eax, ~8
    mov cr4, rax
    cmp r9, {hits}
    jne 9f
    mov rax, r8
    and eax, 0x600f
    cmp eax, {bits}
    jne 9f
    {"cmp r10, r11" if hits else "cmp r10, -1"}
    jne 9f
    mov al, '{letter}'
    jmp 8f
9:  mov al, '-'
8:  {PUT}"""
    return body + """
    hlt
.org 0x1800
    push rax
    mov rax, dr6
    or r8, rax
    mov eax, 0xffff0ff0
    mov dr6, rax
    inc r9
    mov rax, [rsp + 8]
    mov r10, rax
    or qword ptr [rsp + 24], 0x10000     /* RF: the faulting instruction runs on return */
    and qword ptr [rsp + 24], ~0x100     /* TF off: one step per probe */
    pop rax
    iretq
.org 0x1a00
int_40:
    iretq
.org 0x1b00
    add qword ptr [rsp], 2               /* #UD: past the ud2 */
    iretq
"""


def test_breakpoints_and_dr6_as_the_sdm_says():
    out, reason, stats = run(guest(), {1: (0x1800, 0), 0x40: (0x1a00, 0), 6: (0x1b00, 0)})
    want = "".join(p[0] for p in PROBES)
    assert (out.decode(), reason) == (want, StopReason.HALTED)


def test_arming_and_clearing_dr7_takes_effect_at_the_next_instruction():
    # A loop of 5 writes to the watched dword traps 5 times while DR7 arms
    # the breakpoint (the MOV DR7 ends its block); once DR7 is cleared the
    # same loop runs as translated blocks again and never traps.
    loop = f"mov ecx, 5\n1: mov dword ptr [{VAR}], ecx\ndec ecx\njnz 1b\nlea eax, [r9 + 0x30]\n{PUT}"
    asm = f"""
    xor r9, r9
    mov eax, {VAR}
    mov dr0, rax
    mov eax, {dr7(0, 1, 4):#x}
    mov dr7, rax
    {loop}
    xor eax, eax
    mov dr7, rax
    {loop}
    hlt
.org 0x1800
    inc r9
    iretq
"""
    out, reason, _ = run(asm, {1: (0x1800, 0)})
    assert (out, reason) == (b"55", StopReason.HALTED)


def test_rf_from_iretq_covers_one_instruction_and_int3_still_traps():
    # An iretq that loads RF=1 suppresses the execute breakpoint of the one
    # instruction it returns to (SDM Vol. 3, 18.3.1.1), not of the next:
    # x1's (DR0) is not reported, x2's (DR1) is.  An int3 under RF is no
    # instruction breakpoint: it still traps (#BP, RIP after it), while
    # its own execute breakpoint (DR2) stays suppressed; b2's (DR3), after
    # a #BP handler that returns with RF clear, is reported.
    frame = "mov rcx, rsp\npush 0x10\npush rcx\npush 0x10002\npush 0x08\nlea rax, [rip + {0}]\npush rax\niretq\n"
    asm = f"""
    xor r8, r8
    xor r9, r9
    xor r12, r12
    mov r13, -1
    lea rax, [rip + x1]
    mov dr0, rax
    lea rax, [rip + x2]
    mov dr1, rax
    lea rax, [rip + b1]
    mov dr2, rax
    lea rax, [rip + b2]
    mov dr3, rax
    mov eax, {dr7(0, 0) | dr7(1, 0) | dr7(2, 0) | dr7(3, 0):#x}
    mov dr7, rax
    {frame.format("x1")}
x1: nop
x2: nop
    {frame.format("b1")}
b1: int3
b2: nop
    xor eax, eax
    mov dr7, rax
    mov al, '-'
    cmp r9, 2                 /* two #DBs: x2 and b2 */
    jne 9f
    cmp r8, 0xa               /* B1 | B3 */
    jne 9f
    lea rcx, [rip + b2]
    cmp r10, rcx              /* the last #DB faulted at b2 */
    jne 9f
    cmp r12, 1                /* one #BP, returning to b2 */
    jne 9f
    cmp r13, rcx
    jne 9f
    mov al, 'R'
9:  {PUT}
    hlt
.org 0x1800
    push rax
    mov rax, dr6
    and eax, 0xf
    or r8, rax
    mov eax, 0xffff0ff0
    mov dr6, rax
    inc r9
    mov r10, [rsp + 8]
    or qword ptr [rsp + 24], 0x10000     /* RF: the faulting instruction runs on return */
    pop rax
    iretq
.org 0x1900
    inc r12
    mov r13, [rsp]
    and qword ptr [rsp + 16], ~0x10000   /* RF clear: b2's breakpoint counts */
    iretq
"""
    out, reason, _ = run(asm, {1: (0x1800, 0), 3: (0x1900, 0)})
    assert (out, reason) == (b"R", StopReason.HALTED)
