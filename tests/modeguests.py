"""Small assembled guests for comparing engine modes (tests and bench/modes.py).

`user_guest(outer, user_work, kernel_work, syscalls)` is a 64-bit guest
with a user half and a kernel half: CPL0 code sets up syscall/sysret and
irets to CPL3, which runs `outer` rounds of a `user_work`-iteration ALU
loop, each followed (when `syscalls`) by a syscall whose handler runs a
`kernel_work`-iteration loop at CPL0.  Syscall 60 halts the machine with
interrupts off.  Results: RBX (user checksum), R12 (syscalls handled),
R13 (kernel checksum).

`sse_guest(rounds)` runs at CPL0 only: it fills 64 KiB with a pattern and
sums (part of) it `rounds` times with SSE2 (paddq/pxor) and GPRs; XMM0/XMM1 and RBX,
RSI hold the result at the final hlt; it writes CHECKPOINT_PORT after
each round (a place to stop it mid-run).

Both run on the machine pyvmm builds (rawguest.raw_boot layout), so any
engine can run them; `boot_for(code)` places one."""

from __future__ import annotations

import struct

from pyvmm.boot import entry
from pyvmm.boot.result import BootResult
from pyvmm.cpu import Segment

from .rawguest import build_guest

CODE = 0x100000
GDT = 0x110000
TSS = 0x111000
USTACK = 0x141000
KSTACK = 0x151000
DATA = 0x200000
CHECKPOINT_PORT = 0xE0    # sse_guest writes it after each round

# null, kernel code64 (0x08), kernel data (0x10), user data (0x18), user code64 (0x20), TSS (0x28)
GDT_ENTRIES = (0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFF2000000FFFF, 0x00AFFA000000FFFF)

# Kernel-half pieces the assembled test guests share (no braces: they may be
# concatenated into sources that are then str.format()ed).
# SYSCALL_SETUP: EFER.SCE, STAR (kernel CS 0x08, user base 0x10), LSTAR =
# the guest's `sys_entry` label, FMASK = IF.
SYSCALL_SETUP = """    mov ecx, 0xc0000080; rdmsr; or eax, 1; wrmsr
    mov ecx, 0xc0000081; xor eax, eax; mov edx, 0x00100008; wrmsr
    mov ecx, 0xc0000082; mov eax, OFFSET sys_entry; xor edx, edx; wrmsr
    mov ecx, 0xc0000084; mov eax, 0x200; xor edx, edx; wrmsr
"""
# PIC_INIT: both 8259s remapped to vectors 0x20/0x28; PIT_10MS: PIT channel 0
# at 100 Hz; WAIT3: with interrupts on, halt until the handler counted three
# ticks in EBX, then print "D" on COM1 and halt.  PIT_VIA_APIC: the local
# APIC enabled (SVR) and IOAPIC pin 2, where the PIT is, routed to vector 0x31.
PIC_INIT = """
    mov al, 0x11; out 0x20, al; mov al, 0x20; out 0x21, al; mov al, 4; out 0x21, al; mov al, 1; out 0x21, al
    mov al, 0x11; out 0xa0, al; mov al, 0x28; out 0xa1, al; mov al, 2; out 0xa1, al; mov al, 1; out 0xa1, al
"""
PIT_VIA_APIC = """
    mov esi, 0xfee00000
    mov edi, 0xfec00000
    mov dword ptr [rsi + 0xf0], 0x1ff
    mov dword ptr [rdi], 0x14
    mov dword ptr [rdi + 0x10], 0x31
    mov dword ptr [rdi], 0x15
    mov dword ptr [rdi + 0x10], 0
"""
PIT_10MS = "mov al, 0x34; out 0x43, al; mov al, 0x9c; out 0x40, al; mov al, 0x2e; out 0x40, al\n"
WAIT3 = """
    xor ebx, ebx
    sti
1:  hlt
    cmp ebx, 3
    jb 1b
    cli
    mov al, 'D'; mov dx, 0x3f8; out dx, al
    hlt
"""

# IDT_STUBS: a 16-byte stub per vector at label `stubs`, each pushing an
# error code of 0 where the CPU pushes none, then the vector, and jumping to
# the guest's `common` label.
IDT_STUBS = """
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
"""


def enter_user(rflags: int = 0x2) -> str:
    """An iretq to the guest's `user` label at CPL3 (code 0x23, data 0x1b)
    with `rflags`, on the `{ustack}` stack the source is formatted with."""
    return ("    push 0x1b\n    push {ustack}\n"
            f"    push {rflags:#x}\n    push 0x23\n    push OFFSET user\n    iretq\n")


def idt_setup(idt: int) -> str:
    """Fills a 256-entry IDT at `idt` with DPL-3 interrupt gates to IDT_STUBS
    and loads it (uses RAX, RCX, RSI, RDI)."""
    return f"""
    mov edi, {idt:#x}
    mov esi, OFFSET stubs
    xor ecx, ecx
1:  mov eax, esi
    mov word ptr [rdi], ax
    mov word ptr [rdi+2], 8
    mov word ptr [rdi+4], 0xEE00
    shr eax, 16
    mov word ptr [rdi+6], ax
    mov qword ptr [rdi+8], 0
    add rdi, 16
    add esi, 16
    inc ecx
    cmp ecx, 256
    jne 1b
    sub rsp, 16
    mov word ptr [rsp], 4095
    mov qword ptr [rsp+2], {idt:#x}
    lidt [rsp]
    add rsp, 16
"""


USER_GUEST = """
.intel_syntax noprefix
""" + SYSCALL_SETUP + """    xor r12, r12
    xor r13, r13
""" + enter_user() + """sys_entry:
    cmp eax, 60
    je done
    inc r12
    mov r10d, {kwork}
2:  imul r13, r13, 17
    add r13, r10
    dec r10d
    jnz 2b
    sysretq
done:
    hlt
user:
    xor ebx, ebx
    mov r8d, {outer}
1:  mov r9d, {uwork}
3:  imul ebx, ebx, 31
    add ebx, r9d
    xor ebx, 0x55
    dec r9d
    jnz 3b
    {maybe_syscall}
    dec r8d
    jnz 1b
    mov eax, 60
    syscall
"""

SSE_GUEST = """
.intel_syntax noprefix
    mov rax, cr0; and eax, ~4; or eax, 2; mov cr0, rax
    mov rax, cr4; or eax, 0x600; mov cr4, rax
    mov edi, {data}
    mov ecx, 8192
    mov eax, 0x9e3779b9
1:  mov [rdi], rax
    imul rax, rax, 0x5851f42d
    add rax, rcx
    add rdi, 8
    dec ecx
    jnz 1b
    pxor xmm0, xmm0
    pxor xmm1, xmm1
    xor ebx, ebx
    xor esi, esi
    mov r8d, {rounds}
4:  mov edi, {data}
    mov ecx, {blocks}
2:  movdqa xmm2, [rdi]
    paddq xmm0, xmm2
    pxor xmm1, xmm2
    psllq xmm1, 1
    add rbx, [rdi]
    rol rbx, 3
    add rdi, 16
    dec ecx
    jnz 2b
    inc esi
    out {checkpoint}, al
    dec r8d
    jnz 4b
    hlt
"""


def user_guest(outer: int, user_work: int, kernel_work: int = 1, syscalls: bool = True) -> bytes:
    """The user/kernel guest's code (see the module docstring)."""
    src = USER_GUEST.format(ustack=USTACK, kwork=max(kernel_work, 1), outer=outer, uwork=max(user_work, 1),
                            maybe_syscall="xor eax, eax; syscall" if syscalls else "")
    return build_guest(src, "long")


def sse_guest(rounds: int, blocks: int = 4096) -> bytes:
    """The SSE checksum guest: `rounds` passes over `blocks` 16-byte blocks (at most 4096)."""
    return build_guest(SSE_GUEST.format(data=DATA, rounds=rounds, blocks=min(blocks, 4096),
                                        checkpoint=CHECKPOINT_PORT), "long")


def user_result(regs: dict) -> tuple[int, int, int]:
    """(user checksum, syscalls, kernel checksum) from the final registers."""
    return regs["rbx"] & 0xFFFFFFFF, regs["r12"], regs["r13"]


def expected_user_result(outer: int, user_work: int, kernel_work: int = 1,
                         syscalls: bool = True) -> tuple[int, int, int]:
    """What user_guest computes, in Python."""
    ebx = r13 = 0
    kw = max(kernel_work, 1)
    for _ in range(outer):
        for r9 in range(max(user_work, 1), 0, -1):
            ebx = (((ebx * 31) & 0xFFFFFFFF) + r9 & 0xFFFFFFFF) ^ 0x55
        if syscalls:
            for r10 in range(kw, 0, -1):
                r13 = ((r13 * 17) + r10) & 0xFFFFFFFFFFFFFFFF
    return ebx, outer if syscalls else 0, r13


def boot_for(code: bytes):
    """A boot callable for build_machine: the code at CODE in 64-bit mode,
    with a GDT that has user segments and a TSS, and every page of the
    identity map user-accessible."""
    def boot(memory) -> BootResult:
        memory.write(CODE, code)
        tss_lo = 0x67 | ((TSS & 0xFFFFFF) << 16) | (0x89 << 40) | ((TSS >> 24) & 0xFF) << 56
        memory.write(GDT, b"".join(struct.pack("<Q", d) for d in GDT_ENTRIES) + struct.pack("<QQ", tss_lo, 0))
        memory.write(TSS + 4, struct.pack("<Q", KSTACK))
        st = entry.long_mode_64(memory, CODE)
        pml4 = st.cr3
        pdpt = memory.read_u64(pml4) & ~0xFFF
        memory.write_u64(pml4, memory.read_u64(pml4) | 4)
        for i in range(4):
            memory.write_u64(pdpt + 8 * i, memory.read_u64(pdpt + 8 * i) | 4)
            pd = memory.read_u64(pdpt + 8 * i) & ~0xFFF
            for j in range(512):
                memory.write_u64(pd + 8 * j, memory.read_u64(pd + 8 * j) | 4)
        st.gdt.base, st.gdt.limit = GDT, 7 * 8 - 1
        st.cs = Segment(selector=0x08, base=0, limit=0xFFFFFFFF, type=0xB, s=1, present=1, l=1, g=1)
        for name in ("ds", "es", "ss", "fs", "gs"):
            setattr(st, name, Segment(selector=0x10, base=0, limit=0xFFFFFFFF, type=3, s=1, present=1,
                                      db=1, g=1))
        st.tr = Segment(selector=0x28, base=TSS, limit=0x67, type=0xB, s=0, present=1)
        st.regs["rsp"] = KSTACK - 0x100
        return BootResult(st, "raw-long", f"{len(code)} bytes at 0x{CODE:x}")
    return boot
