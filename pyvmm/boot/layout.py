"""Where pyvmm puts boot-time structures in guest physical memory.

One table, so loaders and firmware tables never overlap.  Everything here is
below 1 MiB except the kernel and the initrd.  A Multiboot kernel may load
over these addresses (QEMU allows it): multiboot.py then writes the boot GDT
first, so the kernel's bytes win, and moves the info structure and its data
area after the kernel."""

GDT_ADDR = 0x0500            # boot GDT (a few descriptors)
IDT_ADDR = 0x0520            # empty IDT (limit 0) for entry states
PROTOCOL_INFO_ADDR = 0x6000  # Multiboot info or PVH hvm_start_info (one per boot)
ZERO_PAGE_ADDR = 0x7000      # Linux boot_params
PML4_ADDR = 0x9000           # identity-map page tables for 64-bit entry
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000             # 4 page directories of 2 MiB pages: the first 4 GiB
CMDLINE_ADDR = 0x20000       # kernel command line (up to CMDLINE_MAX bytes)
CMDLINE_MAX = 0x10000
PROTOCOL_DATA_ADDR = 0x30000  # Multiboot mmap, module list and strings (64 KiB)
PROTOCOL_DATA_MAX = 0x10000
EBDA_ADDR = 0x9FC00          # MP table lives here; reserved in the e820 map
EBDA_END = 0xA0000
BIOS_AREA_ADDR = 0xE0000     # ACPI RSDP and tables; reserved in the e820 map
BIOS_AREA_END = 0x100000
HIMEM_START = 0x100000       # default load address of protected-mode kernels
INITRD_ADDR_MAX = 0x37FFFFFF  # highest byte an initrd may use (boot protocol default)

# KVM needs three pages for the real-mode TSS and one for the identity map on
# Intel; they sit in the MMIO hole below 4 GiB, away from RAM.
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000
KVM_TSS_ADDR = 0xFFFBD000

# Local APIC and IOAPIC (fixed by the PC architecture).
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000


def e820_map(ram_ranges: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The (addr, size, type) map pyvmm gives every guest: RAM minus the EBDA
    and BIOS areas, which are reserved (type 2)."""
    out: list[tuple[int, int, int]] = []
    for start, size in ram_ranges:
        end = start + size
        if start == 0:
            out.append((0, EBDA_ADDR, 1))
            out.append((EBDA_ADDR, EBDA_END - EBDA_ADDR, 2))
            out.append((BIOS_AREA_ADDR, BIOS_AREA_END - BIOS_AREA_ADDR, 2))
            if end > HIMEM_START:
                out.append((HIMEM_START, end - HIMEM_START, 1))
        else:
            out.append((start, size, 1))
    return out
