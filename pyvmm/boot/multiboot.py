"""Multiboot (version 1) kernels: header search, loading, the info structure.

A Multiboot kernel carries a 12..48-byte header, 4-byte aligned, in the first
8192 bytes of its file.  It is either an ELF (loaded by program headers, at
p_paddr) or, with header flag bit 16, a raw image whose header gives the load
addresses ("a.out kludge").  The kernel is entered in flat 32-bit protected
mode with paging off, EAX = 0x2BADB002 and EBX = the Multiboot info address.

Where things go (see layout.py):

- the info structure at layout.PROTOCOL_INFO_ADDR;
- memory map, module list, then strings at layout.PROTOCOL_DATA_ADDR;
- modules (config.initrd, in order) page-aligned above the kernel.

A kernel may load anywhere in RAM, below 1 MiB too (as QEMU allows: real-mode
test kernels at 0x8000, `ld -Ttext 0x100000` ELFs whose headers segment
starts at 0xff000).  The boot GDT is written before the kernel, so kernel
bytes win where they overlap it (the entry state's segment registers are
loaded already, and the spec leaves GDTR undefined); when the kernel covers
the info structure or the data area, both move to the pages after the
modules.

ELF kernels are parsed and loaded by elf.py, the one ELF reader; the module
loader and the boot data area here are shared with the PVH loader (pvh.py).
"""

from __future__ import annotations

import logging
import os
import struct

from ..config import VmConfig
from ..errors import ImageError
from ..memory import GuestMemory
from . import layout
from .elf import is_elf, load_elf, parse_elf
from .entry import protected_mode_32
from .result import BootResult

log = logging.getLogger(__name__)

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192
PAGE = 0x1000
BOOTLOADER_NAME = "pyvmm"

# Header flags.  Bits 0..15 are requirements: a loader must refuse a kernel
# asking for one it does not know.  Bits 16..31 are optional features.
HF_PAGE_ALIGN = 1 << 0   # modules page-aligned (always done)
HF_MEMORY_INFO = 1 << 1  # mem_* and mmap_* (always given)
HF_VIDEO_MODE = 1 << 2   # graphics mode fields: accepted, ignored (text console)
HF_AOUT_KLUDGE = 1 << 16
HF_KNOWN_REQUIRED = HF_PAGE_ALIGN | HF_MEMORY_INFO | HF_VIDEO_MODE

# Info flags.
MBI_MEMORY = 1 << 0
MBI_CMDLINE = 1 << 2
MBI_MODS = 1 << 3
MBI_MMAP = 1 << 6
MBI_LOADER_NAME = 1 << 9

# magic, flags, checksum, then (bit 16) header_addr, load_addr, load_end_addr,
# bss_end_addr, entry_addr.
HEADER = struct.Struct("<III")
AOUT_FIELDS = struct.Struct("<IIIII")
# The info structure up to and including the VBE/framebuffer fields (116 bytes).
# flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr,
# syms[4], mmap_length, mmap_addr, drives_length, drives_addr, config_table,
# boot_loader_name, apm_table; then VBE and framebuffer fields, left zero.
INFO = struct.Struct("<IIIIIII16sIIIIIII44x")
MODULE = struct.Struct("<IIII")   # mod_start, mod_end, string, reserved
MMAP_ENTRY = struct.Struct("<IQQI")  # size (20, not counting itself), base, length, type


# ---------------------------------------------------------- shared loaders
def check_load_range(memory: GuestMemory, start: int, end: int, what: str,
                     low_ok: bool = False) -> None:
    """Raises ImageError unless [start, end) is RAM, and at or above 1 MiB
    unless `low_ok`."""
    if start < layout.HIMEM_START and not low_ok:
        raise ImageError(f"{what} loads at 0x{start:x}, below 1 MiB where pyvmm keeps boot data")
    if end <= start or not memory.is_ram(start, end - start):
        raise ImageError(f"{what} at 0x{start:x}..0x{end:x} is outside guest RAM "
                         f"({memory.size >> 20} MiB)")


def load_modules(memory: GuestMemory, paths: list[str], start: int) -> list[tuple[int, int, str]]:
    """Loads each file page-aligned from `start` on; returns [(addr, size, name)].

    Raises ImageError when a file cannot be read or does not fit in RAM."""
    out = []
    addr = (start + PAGE - 1) & ~(PAGE - 1)
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError(f"module {path}: {e.strerror or e}") from None
        if not memory.is_ram(addr, max(len(data), 1)) or addr + len(data) > 0xFFFFFFFF:
            raise ImageError(f"module {path} ({len(data)} bytes) does not fit in guest RAM at 0x{addr:x}")
        memory.write(addr, data)
        out.append((addr, len(data), path))
        addr = (addr + len(data) + PAGE - 1) & ~(PAGE - 1)
    return out


class DataArea:
    """Bump allocator over layout.PROTOCOL_DATA_ADDR (or `base`) for tables and strings."""

    def __init__(self, memory: GuestMemory, base: int = layout.PROTOCOL_DATA_ADDR):
        self.memory = memory
        self.base = self.next = base

    def put(self, data: bytes, align: int = 8) -> int:
        """Writes data; returns its address. Raises ImageError when the area is full."""
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + len(data) > self.base + layout.PROTOCOL_DATA_MAX:
            raise ImageError("boot information (command line, module names) exceeds 64 KiB")
        self.memory.write(addr, data)
        self.next = addr + len(data)
        return addr

    def string(self, text: str) -> int:
        return self.put(text.encode() + b"\0", align=1)


# ---------------------------------------------------------------- Multiboot
def _find_header(image: bytes) -> int | None:
    limit = min(len(image), SEARCH_LIMIT) - 4
    for off in range(0, limit + 1, 4):
        if struct.unpack_from("<I", image, off)[0] == HEADER_MAGIC:
            return off
    return None


def probe(image: bytes) -> bool:
    """True when the image has the Multiboot magic, 4-byte aligned, in its
    first 8192 bytes (a bad header is then reported by load())."""
    return _find_header(image) is not None


def _load_aout(memory: GuestMemory, image: bytes, off: int) -> tuple[int, int, int]:
    """Loads by the header's address fields; returns (low, end, entry)."""
    if off + HEADER.size + AOUT_FIELDS.size > len(image):
        raise ImageError("multiboot: truncated header (address fields missing)")
    header_addr, load_addr, load_end, bss_end, entry = AOUT_FIELDS.unpack_from(image, off + HEADER.size)
    if load_addr > header_addr:
        raise ImageError(f"multiboot: load_addr 0x{load_addr:x} is above header_addr 0x{header_addr:x}")
    file_start = off - (header_addr - load_addr)
    if file_start < 0:
        raise ImageError("multiboot: header_addr - load_addr reaches before the start of the file")
    size = (load_end - load_addr) if load_end else len(image) - file_start
    if size <= 0 or file_start + size > len(image):
        raise ImageError(f"multiboot: load_end_addr 0x{load_end:x} is past the end of the file")
    end = load_addr + size
    if bss_end and bss_end < end:
        raise ImageError(f"multiboot: bss_end_addr 0x{bss_end:x} is below the loaded image")
    top = max(end, bss_end)
    check_load_range(memory, load_addr, top, "multiboot kernel", low_ok=True)
    if not load_addr <= entry < top:
        raise ImageError(f"multiboot: entry_addr 0x{entry:x} is outside the loaded image")
    memory.write(load_addr, image[file_start:file_start + size])
    if top > end:
        memory.fill(end, top - end)
    return load_addr, top, entry


def _check_header(image: bytes) -> tuple[int, int]:
    """Returns (offset, flags) of a valid header; raises ImageError otherwise."""
    off = _find_header(image)
    if off is None:
        raise ImageError("multiboot: no header in the first 8192 bytes")
    if off + HEADER.size > len(image):
        raise ImageError("multiboot: truncated header")
    magic, flags, checksum = HEADER.unpack_from(image, off)
    if (magic + flags + checksum) & 0xFFFFFFFF:
        raise ImageError(f"multiboot: bad header checksum 0x{checksum:08x} (flags 0x{flags:08x})")
    unknown = flags & 0xFFFF & ~HF_KNOWN_REQUIRED
    if unknown:
        raise ImageError(f"multiboot: kernel requires unsupported features (flags 0x{unknown:04x})")
    return off, flags


def _info_block(memory: GuestMemory, config: VmConfig,
                modules: list[tuple[int, int, str]], data_addr: int) -> bytes:
    data = DataArea(memory, data_addr)
    ram = memory.ram_ranges()
    low_end = next((start + size for start, size in ram if start == 0), 0)
    mem_lower = min(layout.EBDA_ADDR, low_end) // 1024
    mem_upper = max(0, low_end - layout.HIMEM_START) // 1024
    e820 = layout.e820_map(ram)
    mmap = b"".join(MMAP_ENTRY.pack(MMAP_ENTRY.size - 4, a, s, t) for a, s, t in e820)
    mmap_addr = data.put(mmap)
    mod_table = b""
    for addr, size, name in modules:
        mod_table += MODULE.pack(addr, addr + size, data.string(name), 0)
    mods_addr = data.put(mod_table) if modules else 0
    # As other Multiboot loaders do, the command line starts with the kernel's name.
    cmdline = " ".join(p for p in (config.kernel or "", config.cmdline) if p)
    cmdline_addr = data.string(cmdline)
    name_addr = data.string(BOOTLOADER_NAME)
    flags = MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME
    return INFO.pack(flags, mem_lower, mem_upper, 0, cmdline_addr, len(modules), mods_addr,
                     b"", len(mmap), mmap_addr, 0, 0, 0, name_addr, 0)


def _boot_data_place(memory: GuestMemory, spans: list[tuple[int, int]], top: int) -> tuple[int, int]:
    """(info address, data area address): layout's, unless a kernel span
    covers one of them; then the pages from `top` on.  Raises ImageError
    when those are not RAM."""
    fixed = ((layout.PROTOCOL_INFO_ADDR, layout.PROTOCOL_INFO_ADDR + INFO.size),
             (layout.PROTOCOL_DATA_ADDR, layout.PROTOCOL_DATA_ADDR + layout.PROTOCOL_DATA_MAX))
    if not any(a < e and s < b for a, b in fixed for s, e in spans):
        return layout.PROTOCOL_INFO_ADDR, layout.PROTOCOL_DATA_ADDR
    info = (top + PAGE - 1) & ~(PAGE - 1)
    data = info + PAGE
    end = data + layout.PROTOCOL_DATA_MAX
    if end > 1 << 32 or not memory.is_ram(info, end - info):
        raise ImageError(f"multiboot: no room for the boot information after the kernel (0x{info:x})")
    return info, data


def load(memory: GuestMemory, config: VmConfig, image: bytes) -> BootResult:
    """Loads a Multiboot kernel, its modules (config.initrd) and the info structure.

    Raises ImageError for a truncated header, a bad checksum, required
    features pyvmm lacks, a non-ELF image without the a.out-kludge fields,
    or anything that would land outside guest RAM."""
    off, flags = _check_header(image)
    cpu = protected_mode_32(memory, 0)       # boot GDT first: the kernel may overlay it
    if flags & HF_AOUT_KLUDGE:
        low, end, entry = _load_aout(memory, image, off)
        spans = [(low, end)]
    else:
        if not is_elf(image):
            raise ImageError("multiboot: image is not ELF and its header has no address fields (flag 16)")
        elf = parse_elf(image)
        loaded = load_elf(memory, image, elf, what="multiboot kernel")
        low, end = loaded.low, loaded.high
        spans = [(addr, addr + size) for addr, size in loaded.segments]
        entry = elf.physical_entry()
    modules = load_modules(memory, list(config.initrd), end)
    top = max([end] + [a + n for a, n, _ in modules])
    info_addr, data_addr = _boot_data_place(memory, spans, top)
    memory.write(info_addr, _info_block(memory, config, modules, data_addr))
    cpu.rip = entry
    cpu.regs["rax"] = BOOTLOADER_MAGIC
    cpu.regs["rbx"] = info_addr
    mods = ", ".join(f"{os.path.basename(n)}@0x{a:x}" for a, _s, n in modules)
    summary = (f"multiboot kernel 0x{low:x}..0x{end:x} entry 0x{entry:x}, "
               f"info at 0x{info_addr:x}" + (f", modules {mods}" if mods else ""))
    log.debug(summary)
    return BootResult(cpu=cpu, protocol="multiboot", summary=summary)
