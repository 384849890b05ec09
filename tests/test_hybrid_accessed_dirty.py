"""Accessed/dirty bits under hybrid: the kernel (in bt) clears them, user
code (under KVM) must set them again (issue 14).

Linux reclaims and frees pages (MADV_FREE, page aging) by clearing a PTE's
dirty or accessed bit and flushing the TLB; the next user write must set D
again, or the kernel drops a page user code wrote.  KVM caches the guest's
PTE with its A/D state, so pyvmm must notice that the kernel cleared a bit
that KVM had set during the last user run.

The guest's user half writes a window page, makes a system call (the
kernel saves the PTE in R12 and clears A and D, then invlpg), writes again
(the kernel saves the PTE in R13 and clears A only), reads it (the kernel
saves the PTE in R14).  bt runs the same guest: both engines must set the
bits as the CPU does."""

from __future__ import annotations

import pytest

from pyvmm.config import VmConfig
from pyvmm.engines.hybrid.ptwatch import PageTableWatch
from pyvmm.machine import StopReason
from pyvmm.memory import GuestMemory

from .hybridguest import WINDOW_TABLE
from .modeguests import SYSCALL_SETUP, USTACK, boot_for, enter_user
from .rawguest import build_guest, require_kvm, run_machine

WINDOW = 0x40000000
FRAME = 0x300000
PT = 0x310000          # the window's page table
ACCESSED, DIRTY = 1 << 5, 1 << 6

SOURCE = """
.intel_syntax noprefix
""" + SYSCALL_SETUP + WINDOW_TABLE + """    mov qword ptr [{pt}], {frame} + 7
    invlpg [{window}]
    xor r12, r12; xor r13, r13; xor r14, r14
""" + enter_user() + """
sys_entry:
    cmp eax, 60
    je done
    mov rdx, [{pt}]
    cmp eax, 1
    jne 2f
    mov r12, rdx
    and qword ptr [{pt}], ~0x60
    invlpg [{window}]
    sysretq
2:  cmp eax, 2
    jne 3f
    mov r13, rdx
    and qword ptr [{pt}], ~0x20
    invlpg [{window}]
    sysretq
3:  mov r14, rdx
    sysretq
done:
    cli
    hlt
user:
    mov qword ptr [{window}], 1
    mov eax, 1
    syscall
    mov qword ptr [{window}], 2
    mov eax, 2
    syscall
    mov rax, [{window}]
    mov eax, 3
    syscall
    mov eax, 60
    syscall
"""


def _ptes(engine: str) -> tuple[int, int, int]:
    code = build_guest(SOURCE.format(pt=PT, frame=FRAME, window=WINDOW, ustack=USTACK), "long")
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True)
    m, st = run_machine(cfg, boot_for(code), timeout=120)
    assert m.stop_status.reason is StopReason.HALTED, (engine, m.stop_status, hex(st.rip))
    return st.regs["r12"], st.regs["r13"], st.regs["r14"]


@pytest.mark.kvm
@pytest.mark.parametrize("engine", ["bt", "hybrid"])
def test_user_access_sets_bits_the_kernel_cleared(engine):
    if engine == "hybrid":
        require_kvm()
    first, second, third = _ptes(engine)
    assert first & (ACCESSED | DIRTY) == ACCESSED | DIRTY, f"first write: PTE {first:#x}"
    assert second & DIRTY, f"a write after the kernel cleared D left it clear: PTE {second:#x}"
    assert second & ACCESSED, f"a write after the kernel cleared A left it clear: PTE {second:#x}"
    assert third & ACCESSED, f"a read after the kernel cleared A left it clear: PTE {third:#x}"
    assert third & DIRTY, f"D was not cleared by the kernel this time: PTE {third:#x}"


# -- the same sequence on hand-built tables (no KVM) ----------------------------------

PML4, PDPT, PD, PTBL = 0x10000, 0x11000, 0x12000, 0x13000


@pytest.fixture
def tables():
    mem = GuestMemory(2 << 20)
    mem.write_u64(PML4, PDPT | 7)
    mem.write_u64(PDPT, PD | 7)
    mem.write_u64(PD, PTBL | 7)
    mem.write_u64(PTBL, 0x100000 | 7)
    yield mem
    mem.close()


@pytest.mark.parametrize("cleared", [DIRTY, ACCESSED, ACCESSED | DIRTY])
def test_watch_drops_when_the_kernel_clears_bits_kvm_set(tables, cleared):
    w = PageTableWatch(tables)
    assert not w.needs_drop(PML4, True)                 # entry: no A/D yet
    tables.write_u64(PTBL, 0x100000 | 7 | ACCESSED | DIRTY)   # KVM sets A and D while user code runs
    w.after_run()                                       # exit: the watch learns KVM's bits
    tables.write_u64(PTBL, (0x100000 | 7 | ACCESSED | DIRTY) & ~cleared)   # the kernel clears some
    assert w.needs_drop(PML4, True)


def test_watch_keeps_kvm_cache_when_only_kvm_set_bits(tables):
    w = PageTableWatch(tables)
    assert not w.needs_drop(PML4, True)
    tables.write_u64(PD, PTBL | 7 | ACCESSED)           # KVM's walk sets A at every level
    tables.write_u64(PTBL, 0x100000 | 7 | ACCESSED | DIRTY)
    w.after_run()
    assert not w.needs_drop(PML4, True)
    assert w.drops == 0
