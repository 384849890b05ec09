"""A small guest for the places where Intel and AMD CPUs differ in what a
guest sees (SYSENTER/SYSEXIT in long mode, SYSCALL in compatibility mode,
SYSRET to a non-canonical RIP) and for the user-mode events the hybrid
engine hands back to bt (tests/test_vendor_differences.py).

The kernel half (CPL0, 64-bit) loads a Linux-like GDT, sets up SYSCALL
(STAR: kernel CS 0x08, user base 0x18), CSTAR, SYSENTER (CS 0x08, ESP =
SE_STACK, EIP = HIGH_ALIAS + the entry: above 4 GiB, so all 64 bits count)
and an IDT whose gates are DPL 3 except vector 0x81, then runs one case's
`kernel` text (usually an iretq to 64-bit or compatibility-mode user code).
User code runs the case's `user` text; the instruction of interest carries
the label `fault`, the one after it `after` (the kernel stores both).
Whichever entry is taken (an IDT vector, LSTAR, CSTAR or SYSENTER_EIP)
records what the CPU handed it at RESULT (see FIELDS) and halts.  A user
instruction that raises nothing runs into `hlt`, which is #GP at CPL3, so
every case ends in a record."""

from __future__ import annotations

import struct

from .modeguests import DATA, IDT_STUBS, TSS, USTACK, idt_setup
from .rawguest import build_guest

IDT = 0x120000
GDT2 = 0x112000
RESULT = DATA
SE_STACK = 0x123456789AB0          # SYSENTER_ESP: canonical, far above 4 GiB
HIGH_ALIAS = 0x8000000000          # PML4 entry 1 maps the first 512 GiB again from here
NONCANONICAL = 0x800000000000
USER_RFLAGS = 0x8C3                # OF, SF, ZF, CF (and bit 1): seen again in every frame
R11_MARK, RCX_MARK = 0x2222, 0x1111

KERNEL_CS, KERNEL_SS = 0x08, 0x10
USER32_CS, USER_SS, USER64_CS, USER_SS_SYSEXIT64 = 0x1B, 0x23, 0x2B, 0x33

# Linux-like: null, kernel code64, kernel data, user code32, user data, user code64, user data, TSS.
_GDT = (0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFFA000000FFFF, 0x00CFF2000000FFFF,
        0x00AFFA000000FFFF, 0x00CFF2000000FFFF)
_TSS_LO = 0x67 | ((TSS & 0xFFFFFF) << 16) | (0x89 << 40) | ((TSS >> 24) & 0xFF) << 56

# The record: qword index of each field at RESULT.
FIELDS = ("entry", "vector", "error", "frame_rip", "frame_cs", "frame_rflags", "frame_rsp", "frame_ss",
          "handler_rsp", "handler_cs", "cr2", "handler_rip", "rcx", "r11", "handler_ss",
          "fault", "after", "kernel_rsp")
ENTRY_IDT, ENTRY_LSTAR, ENTRY_CSTAR, ENTRY_SYSENTER = 1, 2, 3, 4


def _at(name: str) -> str:
    return f"{RESULT + 8 * FIELDS.index(name):#x}"


def _record(kind: int, frame: bool) -> str:
    """Stores what an entry point received and halts (interrupts are off at every entry)."""
    lines = [f"    mov qword ptr [{_at('entry')}], {kind}",
             f"    mov [{_at('rcx')}], rcx", f"    mov [{_at('r11')}], r11", f"    mov [{_at('handler_rsp')}], rsp",
             "    lea rax, [rip]", f"    mov [{_at('handler_rip')}], rax",
             "    mov ax, cs", "    movzx eax, ax", f"    mov [{_at('handler_cs')}], rax",
             "    mov ax, ss", "    movzx eax, ax", f"    mov [{_at('handler_ss')}], rax",
             "    mov rax, cr2", f"    mov [{_at('cr2')}], rax"]
    if frame:
        for i, name in enumerate(("vector", "error", "frame_rip", "frame_cs", "frame_rflags", "frame_rsp",
                                  "frame_ss")):
            lines += [f"    mov rax, [rsp + {8 * i}]", f"    mov [{_at(name)}], rax"]
    return "\n".join(lines) + "\n    hlt\n"


def _gdt_setup() -> str:
    lines = []
    for i, d in enumerate((*_GDT, _TSS_LO, 0)):
        lines += [f"    mov rax, {d:#x}", f"    mov [{GDT2 + 8 * i:#x}], rax"]
    return "\n".join(lines) + f"""
    sub rsp, 16
    mov word ptr [rsp], {8 * 9 - 1}
    mov qword ptr [rsp+2], {GDT2:#x}
    lgdt [rsp]
    add rsp, 16
    mov ax, 0x38
    ltr ax
"""


def wrmsr(msr: int, value: str) -> str:
    return f"    mov ecx, {msr:#x}; movabs rax, {value}; mov rdx, rax; shr rdx, 32; wrmsr\n"


def enter_user(cs: int, label: str, rflags: int = USER_RFLAGS) -> str:
    """The kernel text of an iretq to `label` at CPL3 with code selector `cs`."""
    return (f"    push {USER_SS:#x}\n    push {USTACK:#x}\n    push {rflags:#x}\n"
            f"    push {cs:#x}\n    push OFFSET {label}\n    iretq\n")


def sysexit_to(size: int, label: str) -> str:
    """The kernel text of a SYSEXIT (REX.W when size is 8) to `label` on USTACK."""
    return (f"    push {USER_RFLAGS:#x}\n    popfq\n    mov rcx, {USTACK:#x}\n    mov rdx, OFFSET {label}\n"
            + ("    .byte 0x48, 0x0f, 0x35\n" if size == 8 else "    .byte 0x0f, 0x35\n"))


SYSRET_NONCANONICAL = (f"    mov rcx, {NONCANONICAL:#x}\n    mov r11, {USER_RFLAGS:#x}\n"
                       f"    mov [{_at('kernel_rsp')}], rsp\nfault:\n    sysretq\nafter:\n    hlt\n")

SYSEXIT_NONCANONICAL = (f"    mov [{_at('kernel_rsp')}], rsp\n    mov rcx, {USTACK:#x}\n"
                        f"    mov rdx, {NONCANONICAL:#x}\nfault:\n    .byte 0x48, 0x0f, 0x35\nafter:\n    hlt\n")

SOURCE = """
.intel_syntax noprefix
""" + _gdt_setup() + "    mov ecx, 0xc0000080; rdmsr; or eax, 1; wrmsr\n" + wrmsr(0xC0000081, "0x0018000800000000") \
    + wrmsr(0xC0000082, "OFFSET sys_entry") + wrmsr(0xC0000083, "OFFSET cstar_entry") \
    + wrmsr(0xC0000084, "0x200") + wrmsr(0x174, f"{KERNEL_CS:#x}") + wrmsr(0x175, f"{SE_STACK:#x}") \
    + wrmsr(0x176, f"OFFSET sysenter_entry + {HIGH_ALIAS:#x}") + """
    mov rax, cr3
    mov rcx, [rax]
    mov [rax + 8], rcx
""" + idt_setup(IDT) + f"""
    mov word ptr [{IDT + 0x81 * 16 + 4:#x}], 0x8E00
    mov qword ptr [{_at('fault')}], OFFSET fault
    mov qword ptr [{_at('after')}], OFFSET after
    mov r11, {R11_MARK:#x}
    mov rcx, {RCX_MARK:#x}
""" + "{kernel}" + """
sys_entry:
""" + _record(ENTRY_LSTAR, False) + """
cstar_entry:
""" + _record(ENTRY_CSTAR, False) + """
sysenter_entry:
""" + _record(ENTRY_SYSENTER, False) + """
common:
""" + _record(ENTRY_IDT, True) + IDT_STUBS + """
user64:
{user64}
    hlt
.code32
user32:
{user32}
    hlt
"""


def vendor_guest(kernel: str, user64: str = "", user32: str = "") -> bytes:
    """The guest with one case's kernel text and user code (64-bit at
    `user64`, compatibility mode at `user32`)."""
    src = SOURCE.replace("{kernel}", kernel).replace("{user64}", user64).replace("{user32}", user32)
    return build_guest(src, "long")


def record(raw: bytes) -> dict[str, int]:
    """The fields of RESULT as a dict."""
    return dict(zip(FIELDS, struct.unpack_from(f"<{len(FIELDS)}Q", raw)))


RECORD_SIZE = 8 * len(FIELDS)
