"""Entry states: the CPU as each boot protocol wants it at the first instruction.

Protected and long mode entries get a flat boot GDT at layout.GDT_ADDR; long
mode also gets page tables that identity-map the first 4 GiB with 2 MiB pages."""

from __future__ import annotations

import struct

from ..cpu import (CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME,
                   RFLAGS_RESERVED1, CpuState, DescriptorTable, Segment)
from ..memory import GuestMemory
from . import layout

# Boot GDT selectors, as the Linux boot protocol expects (__BOOT_CS/__BOOT_DS).
CODE32_SEL = 0x08  # also used by multiboot/PVH (any flat selectors are allowed)
CODE64_SEL = 0x10  # Linux: __BOOT_CS is 0x10
DATA_SEL = 0x18    # Linux: __BOOT_DS is 0x18
TSS_SEL = 0x20

_PTE_P, _PTE_W, _PTE_PS = 1, 2, 0x80


def real_mode(cs: int, ip: int, ds: int | None = None) -> CpuState:
    """Real-mode state with CS:IP = cs:ip and the data segments at `ds` (default cs)."""
    st = CpuState()
    st.cs = Segment.real_mode(cs, code=True)
    data = cs if ds is None else ds
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(st, name, Segment.real_mode(data))
    st.rip = ip
    st.cr0 = CR0_ET | CR0_NE
    return st


def _write_gdt(mem: GuestMemory) -> None:
    descs = [
        0,
        Segment.flat(CODE32_SEL, code=True).descriptor(),
        Segment.flat(CODE64_SEL, code=True, long_mode=True).descriptor(),
        Segment.flat(DATA_SEL, code=False).descriptor(),
        Segment(selector=TSS_SEL, base=0, limit=0x67, type=0xB, s=0).descriptor(),
    ]
    mem.write(layout.GDT_ADDR, struct.pack(f"<{len(descs)}Q", *descs))


def _common_protected(mem: GuestMemory, st: CpuState, code: Segment) -> None:
    _write_gdt(mem)
    st.gdt = DescriptorTable(layout.GDT_ADDR, 5 * 8 - 1)
    st.idt = DescriptorTable(layout.IDT_ADDR, 0)
    st.cs = code
    data = Segment.flat(DATA_SEL, code=False)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(st, name, Segment(**vars(data)))
    st.tr = Segment(selector=TSS_SEL, base=0, limit=0x67, type=0xB, s=0)
    st.rflags = RFLAGS_RESERVED1


def protected_mode_32(mem: GuestMemory, entry: int) -> CpuState:
    """Flat 32-bit protected mode, paging off, interrupts off (Multiboot, PVH, Linux 32-bit)."""
    st = CpuState()
    _common_protected(mem, st, Segment.flat(CODE32_SEL, code=True))
    st.cr0 = CR0_PE | CR0_ET | CR0_NE
    st.rip = entry
    return st


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Identity-maps 0..4 GiB with 2 MiB pages; returns the CR3 value."""
    mem.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | _PTE_P | _PTE_W)
    pdpt = b"".join(struct.pack("<Q", (layout.PD_ADDR + i * 0x1000) | _PTE_P | _PTE_W) for i in range(4))
    mem.write(layout.PDPT_ADDR, pdpt)
    pd = struct.pack("<2048Q", *[(i << 21) | _PTE_P | _PTE_W | _PTE_PS for i in range(2048)])
    mem.write(layout.PD_ADDR, pd)
    return layout.PML4_ADDR


def long_mode_64(mem: GuestMemory, entry: int) -> CpuState:
    """64-bit long mode with identity paging of the first 4 GiB (Linux 64-bit boot protocol)."""
    st = CpuState()
    _common_protected(mem, st, Segment.flat(CODE64_SEL, code=True, long_mode=True))
    st.cr3 = write_identity_page_tables(mem)
    st.cr4 = CR4_PAE
    st.cr0 = CR0_PE | CR0_PG | CR0_ET | CR0_NE
    st.efer = EFER_LME | EFER_LMA
    st.rip = entry
    return st
