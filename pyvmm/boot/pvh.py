"""PVH boot: an ELF kernel entered at the address in its Xen PHYS32_ENTRY note.

The kernel is loaded by program headers at p_paddr, modules (config.initrd)
page-aligned above it, and entered in flat 32-bit protected mode, paging off,
with EBX = the address of an hvm_start_info (version 1) at
layout.PROTOCOL_INFO_ADDR.  The start info points at the module list, the
command line, the memory map (all at layout.PROTOCOL_DATA_ADDR) and the ACPI
RSDP, which the builder writes with acpi.write_acpi_tables at acpi.RSDP_ADDR.

Linux kernels carry the same note but keep their own boot protocol, so
probe() refuses ELF files that say they are Linux.
"""

from __future__ import annotations

import logging
import struct

from ..config import VmConfig
from ..errors import ImageError
from ..memory import GuestMemory
from . import layout
from .acpi import RSDP_ADDR
from .entry import protected_mode_32
from .elf import (XEN_ELFNOTE_GUEST_OS, XEN_NOTE_OWNER, ElfFile, elf_notes, is_elf, load_elf,
                  parse_elf, pvh_entry)
from .multiboot import DataArea, load_modules
from .result import BootResult

log = logging.getLogger(__name__)

START_INFO_MAGIC = 0x336EC578
START_INFO_VERSION = 1

# magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr, rsdp_paddr,
# (version 1:) memmap_paddr, memmap_entries, reserved.
START_INFO = struct.Struct("<IIIIQQQQII")
MODLIST_ENTRY = struct.Struct("<QQQQ")   # paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")    # addr, size, type, reserved


def _is_linux(image: bytes, elf: ElfFile) -> bool:
    for note in elf_notes(image, elf, sections=True):
        if note.owner == "Linux":
            return True
        if note.owner == XEN_NOTE_OWNER and note.type == XEN_ELFNOTE_GUEST_OS \
                and note.desc.rstrip(b"\0").lower() == b"linux":
            return True
    return False


def probe(image: bytes) -> bool:
    """True for an ELF with a Xen PHYS32_ENTRY note that is not a Linux kernel."""
    if not is_elf(image):
        return False
    try:
        elf = parse_elf(image)
        return pvh_entry(image, elf) is not None and not _is_linux(image, elf)
    except ImageError:
        return False


def load(memory: GuestMemory, config: VmConfig, image: bytes) -> BootResult:
    """Loads a PVH kernel, its modules and the hvm_start_info.

    Raises ImageError when the image is not an ELF with the PVH note, when
    its segments or modules fall outside guest RAM, or when the entry point
    is not inside a loaded segment."""
    elf = parse_elf(image)
    entry = pvh_entry(image, elf)
    if entry is None:
        raise ImageError("PVH: ELF has no Xen PHYS32_ENTRY note")
    loaded = load_elf(memory, image, elf, what="PVH kernel", low_ok=False)
    low, end = loaded.low, loaded.high
    if not low <= entry < end:
        raise ImageError(f"PVH: entry 0x{entry:x} is outside the loaded kernel 0x{low:x}..0x{end:x}")
    modules = load_modules(memory, list(config.initrd), end)

    data = DataArea(memory)
    e820 = layout.e820_map(memory.ram_ranges())
    memmap_addr = data.put(b"".join(MEMMAP_ENTRY.pack(a, s, t, 0) for a, s, t in e820))
    modlist = b"".join(MODLIST_ENTRY.pack(addr, size, data.string(name), 0)
                       for addr, size, name in modules)
    modlist_addr = data.put(modlist) if modules else 0
    cmdline_addr = data.string(config.cmdline)
    memory.write(layout.PROTOCOL_INFO_ADDR, START_INFO.pack(
        START_INFO_MAGIC, START_INFO_VERSION, 0, len(modules), modlist_addr, cmdline_addr,
        RSDP_ADDR, memmap_addr, len(e820), 0))

    cpu = protected_mode_32(memory, entry)
    cpu.regs["rbx"] = layout.PROTOCOL_INFO_ADDR
    summary = (f"PVH kernel 0x{low:x}..0x{end:x} entry 0x{entry:x}, start info at "
               f"0x{layout.PROTOCOL_INFO_ADDR:x}, {len(modules)} module(s)")
    log.debug(summary)
    return BootResult(cpu=cpu, protocol="pvh", summary=summary)
