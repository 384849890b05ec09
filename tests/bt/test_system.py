"""System-level guests on the bt engine: timer interrupts from the PIT
through the 8259 and through the IOAPIC + local APIC, syscall/sysret with a
ring change, an exception delivered on an IST stack, and page-table games
that must give the same output under shadow and nested MMU modes.

Guests run with deterministic guest time, so nothing depends on host speed."""

from __future__ import annotations

import os
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from tests.hostfacts import require_from_setup  # noqa: E402
require_from_setup(programs=["as"], package="binutils")

import harness  # noqa: E402

from pyvmm.boot.entry import long_mode_64  # noqa: E402
from pyvmm.config import VmConfig  # noqa: E402
from pyvmm.cpu import Segment  # noqa: E402
from pyvmm.machine import StopReason  # noqa: E402
from tests.bt.test_guests import make_machine  # noqa: E402
from tests.modeguests import PIC_INIT, PIT_10MS, PIT_VIA_APIC, WAIT3  # noqa: E402

CODE, IDT, GDT, TSS = 0x100000, 0x110000, 0x111000, 0x112000
KSTACK, IST1, USTACK = 0x121000, 0x131000, 0x141000



def gate(handler: int, ist: int = 0, dpl: int = 0) -> bytes:
    lo = (handler & 0xFFFF) | (0x08 << 16) | (ist << 32) | ((0x8E | dpl << 5) << 40) | ((handler >> 16) & 0xFFFF) << 48
    return struct.pack("<QQ", lo, handler >> 32)


def run(asm: str, handlers: dict[int, tuple[int, int]], mmu: str = "shadow", user_pages: bool = False,
        cpus: int = 1, extra: dict[int, bytes] | None = None, tables: int = 0):
    """Runs `asm` (at CODE) in 64-bit mode with an IDT of `handlers`
    (vector -> (offset in the code, IST)) and `extra` bytes placed in
    memory; returns (uart bytes, stop reason, engine stats).  `tables`
    moves the IDT, GDT and TSS up by that many bytes (user_pages makes
    only the first 2 MiB user-accessible)."""
    IDT, GDT, TSS = globals()["IDT"] + tables, globals()["GDT"] + tables, globals()["TSS"] + tables
    m, eng, uart = make_machine(VmConfig(engine="bt", mem_mib=16, cpus=cpus, mmu=mmu, deterministic=True))
    mem = m.memory
    mem.write(CODE, harness.assemble(asm))
    for addr, data in (extra or {}).items():
        mem.write(addr, data)
    for vec, (off, ist) in handlers.items():
        mem.write(IDT + 16 * vec, gate(CODE + off, ist))
    gdt = [0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFFA000000FFFF, 0x00CFF2000000FFFF,
           0x00AFFA000000FFFF]
    tss_lo = 0x67 | ((TSS & 0xFFFFFF) << 16) | (0x89 << 40) | ((TSS >> 24) & 0xFF) << 56
    mem.write(GDT, b"".join(struct.pack("<Q", d) for d in gdt) + struct.pack("<QQ", tss_lo, 0))
    mem.write(TSS + 4, struct.pack("<Q", KSTACK))          # RSP0
    mem.write(TSS + 0x24, struct.pack("<Q", IST1))         # IST1
    st = long_mode_64(mem, CODE)
    st.gdt.base, st.gdt.limit = GDT, 8 * 8 - 1
    st.idt.base, st.idt.limit = IDT, 256 * 16 - 1
    st.cs = Segment(selector=0x08, base=0, limit=0xFFFFFFFF, type=0xB, s=1, present=1, l=1, g=1)
    for name in ("ds", "es", "ss", "fs", "gs"):
        setattr(st, name, Segment(selector=0x10, base=0, limit=0xFFFFFFFF, type=3, s=1, present=1, db=1, g=1))
    st.tr = Segment(selector=0x30, base=TSS, limit=0x67, type=0xB, s=0, present=1)
    st.regs["rsp"] = KSTACK - 0x100
    if user_pages:   # let CPL 3 use the first 2 MiB
        pml4 = st.cr3
        pdpt = mem.read_u64(pml4) & ~0xFFF
        pd = mem.read_u64(pdpt) & ~0xFFF
        for a in (pml4, pdpt, pd):
            mem.write_u64(a, mem.read_u64(a) | 4)
    eng.load_state(0, st)
    eng.run()
    eng.close()
    return bytes(uart.out), m.stop_status.reason, eng.stats()




def test_pit_interrupts_through_the_pic():
    asm = PIC_INIT + "mov al, 0xfe; out 0x21, al; mov al, 0xff; out 0xa1, al\n" + PIT_10MS + WAIT3 + """
.org 0x100
    push rax; push rdx
    mov al, 'T'; mov dx, 0x3f8; out dx, al
    inc ebx
    mov al, 0x20; out 0x20, al
    pop rdx; pop rax
    iretq
"""
    out, reason, stats = run(asm, {0x20: (0x100, 0)})
    assert out == b"TTTD"
    assert reason is StopReason.HALTED
    assert stats["interrupts_delivered"] == 3


def test_pit_interrupts_through_the_ioapic_and_local_apic():
    asm = PIC_INIT + "mov al, 0xff; out 0x21, al; out 0xa1, al\n" + PIT_VIA_APIC + PIT_10MS + WAIT3 + """
.org 0x100
    push rax; push rdx
    mov al, 'I'; mov dx, 0x3f8; out dx, al
    inc ebx
    mov dword ptr [rsi + 0xb0], 0
    pop rdx; pop rax
    iretq
"""
    out, reason, stats = run(asm, {0x31: (0x100, 0)})
    assert out == b"IIID"
    assert reason is StopReason.HALTED


SYSCALL_GUEST = """
    mov ecx, 0xc0000080; rdmsr; or eax, 1; wrmsr
    mov ecx, 0xc0000081; xor eax, eax; mov edx, 0x00180008; wrmsr
    mov ecx, 0xc0000082; mov eax, 0x100200; xor edx, edx; wrmsr
    mov ecx, 0xc0000084; mov eax, 0x200; xor edx, edx; wrmsr
    push 0x23
    push 0x141000
    push 0x2
    push 0x2b
    push 0x100400
    iretq
.org 0x200
    mov dx, 0x3f8
    out dx, al
    mov ax, cs
    and al, 3
    add al, '0'
    out dx, al
    sysretq
.org 0x300
    mov dx, 0x3f8
    lea rax, [rsp - 0x130000]
    cmp rax, 0x1000
    mov al, 'S'
    jb 1f
    mov al, 'X'
1:  out dx, al
    mov rax, [rsp + 8]
    and al, 3
    add al, '0'
    out dx, al
    cli
    hlt
.org 0x400
    mov eax, 'U'
    syscall
    mov ax, cs
    and eax, 3
    lea ecx, [eax - 3]
    xor edx, edx
    mov eax, 1
    div ecx
"""


def test_syscall_sysret_and_fault_on_an_ist_stack():
    out, reason, stats = run(SYSCALL_GUEST, {0: (0x300, 1)}, user_pages=True)
    assert out == b"U0S3"
    assert reason is StopReason.HALTED


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
def test_fault_from_user_mode_with_supervisor_only_tables(mmu):
    # IDT, GDT and TSS on supervisor pages (as Linux's cpu_entry_area is):
    # delivering a fault from CPL 3 reads them as implicit supervisor
    # accesses, which must not fault.
    out, reason, stats = run(SYSCALL_GUEST, {0: (0x300, 1)}, mmu=mmu, user_pages=True, tables=0x200000)
    assert out == b"U0S3"
    assert reason is StopReason.HALTED


PAGING_GUEST = """
    mov rax, cr0
    or eax, 0x10000
    mov cr0, rax
    mov rdi, cr3
    mov rax, [rdi]
    and rax, ~0xfff
    mov qword ptr [rax + 8], 0x180003
    mov qword ptr [0x180000], 0x181003
    mov qword ptr [0x181000], 0x190003
    mov qword ptr [0x181008], 0x191001
    mov byte ptr [0x190000], 'a'
    mov byte ptr [0x191000], 'b'
    mov dx, 0x3f8
    mov al, [0x40000000]
    out dx, al
    mov qword ptr [0x181000], 0x191003
    invlpg [0x40000000]
    mov al, [0x40000000]
    out dx, al
    mov rax, cr3
    mov cr3, rax
    mov byte ptr [0x40001000], 'c'
    mov al, [0x191000]
    out dx, al
    mov qword ptr [0x181000], 0x190003
    mov cr3, rax
    mov al, [0x40000000]
    out dx, al
    cli
    hlt
.org 0x100
    push rax
    mov rax, cr2
    shr eax, 12
    and al, 0xf
    add al, '0'
    out dx, al
    mov al, [rsp + 8]
    add al, '0'
    out dx, al
    mov qword ptr [0x181008], 0x191003
    pop rax
    add rsp, 8
    iretq
"""


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
def test_page_table_changes(mmu):
    out, reason, stats = run(PAGING_GUEST, {14: (0x100, 0)}, mmu=mmu)
    # a: first mapping; b: after PTE change + invlpg; 1/3: #PF at 0x40001000,
    # present+write; c: the retried write; a: after the remap + CR3 load.
    assert out == b"ab13ca"
    assert reason is StopReason.HALTED
    assert stats["mmu_mode"] == mmu


def test_shadow_and_nested_give_identical_output():
    outs = {mmu: run(PAGING_GUEST + "\n", {14: (0x100, 0)}, mmu=mmu)[0] for mmu in ("shadow", "nested")}
    assert outs["shadow"] == outs["nested"]


def test_init_sipi_starts_the_second_vcpu_in_real_mode():
    bsp = """
    mov esi, 0xfee00000
    mov dword ptr [rsi + 0xf0], 0x1ff
    mov dword ptr [rsi + 0x310], 0x01000000
    mov dword ptr [rsi + 0x300], 0x4500
    mov dword ptr [rsi + 0x310], 0x01000000
    mov dword ptr [rsi + 0x300], 0x4608
1:  cmp byte ptr [0x8100], 0
    je 1b
    mov al, 'B'
    mov dx, 0x3f8
    out dx, al
    cli
    hlt
"""
    ap = harness.assemble("""
    mov al, 'A'
    mov dx, 0x3f8
    out dx, al
    mov byte ptr cs:[0x100], 1
    cli
    hlt
""", bits=16)
    out, reason, stats = run(bsp, {}, cpus=2, extra={0x8000: ap})
    assert out == b"AB"
    assert reason is StopReason.HALTED
    assert all(n > 0 for n in stats["per_cpu_instructions"])


def test_config_rejects_an_unknown_mmu_mode():
    from pyvmm.errors import ConfigError
    VmConfig(engine="bt", mmu="nested", deterministic=True).validate()
    with pytest.raises(ConfigError, match="mmu"):
        VmConfig(engine="bt", mmu="ept").validate()


def test_pause_skips_deterministic_guest_time():
    # Two RDTSCs with 10 PAUSEs between them: each PAUSE is PAUSE_NS of
    # guest time (2 TSC ticks per ns), far more than the few instructions.
    from pyvmm.engines.bt.system import PAUSE_NS
    asm = """
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rbx, rax
    mov ecx, 10
1:  pause
    dec ecx
    jnz 1b
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, rbx
    mov dx, 0x3f8
    mov ecx, 8
2:  out dx, al
    shr rax, 8
    dec ecx
    jnz 2b
    cli
    hlt
"""
    out, reason, stats = run(asm, {})
    ticks = struct.unpack("<Q", out)[0]
    assert 10 * PAUSE_NS * 2 <= ticks < 10 * PAUSE_NS * 2 + 2000
    assert reason is StopReason.HALTED
