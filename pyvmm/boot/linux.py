"""Direct boot of a Linux kernel (bzImage or vmlinux ELF) with the 64-bit boot protocol.

Three ways in:
  * bzImage, host_decompress on, 64-bit kernel: the payload is decompressed
    here and the vmlinux ELF inside is loaded at its physical addresses and
    entered at its ELF entry (startup_64) -- no in-guest decompression;
  * bzImage otherwise: the protected-mode part is loaded at pref_address (a
    relocatable kernel, when it fits) or 0x100000 and entered at +0x200 in
    64-bit mode (or at its start in 32-bit mode for a 32-bit-only kernel);
  * a bare vmlinux ELF: as the first, with a synthesised setup header.
In every case RSI (ESI) holds the zero page address (layout.ZERO_PAGE_ADDR),
the command line sits at layout.CMDLINE_ADDR and the initrd goes as high
as the kernel allows below 4 GiB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..config import VmConfig
from ..cpu import CpuState
from ..errors import ConfigError, ImageError
from ..memory import GuestMemory
from . import layout
from .bzimage import PROTECTED_MODE_ENTRY_64, BzImage, SetupHeader, looks_like_bzimage, parse_bzimage
from .decompress import SUPPORTED_FORMATS, decompress_payload, detect_format
from .elf import ElfImage, is_elf, load_elf, parse_elf
from .entry import long_mode_64, protected_mode_32
from .imagefile import read_image
from .result import BootResult
from .zeropage import build_zero_page, synthesize_header

log = logging.getLogger(__name__)

PAGE = 0x1000
MIB = 1 << 20


@dataclass
class _Kernel:
    """Where the kernel went and how to enter it."""
    low: int            # first byte of its footprint
    high: int           # end of its footprint (what the initrd must avoid)
    entry: int
    long_mode: bool
    header: SetupHeader
    header_bytes: bytes | None
    protocol: str
    code32_start: int | None = None


def _mib(n: int) -> str:
    return f"{(n + MIB - 1) // MIB} MiB"


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1) if a else n


def _low_ram_top(memory: GuestMemory) -> int:
    """End of the RAM region that starts at 0 (all RAM below 4 GiB)."""
    return max((start + size for start, size in memory.ram_ranges() if start == 0), default=0)


def _load_elf_kernel(memory: GuestMemory, path: str, vmlinux: bytes, header: SetupHeader,
                     header_bytes: bytes | None, protocol: str) -> _Kernel:
    try:
        elf = parse_elf(vmlinux)
        img: ElfImage = load_elf(memory, vmlinux, elf)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    return _Kernel(low=img.low, high=img.high, entry=img.entry, long_mode=img.is_64bit,
                   header=header, header_bytes=header_bytes, protocol=protocol)


def _load_bzimage_kernel(memory: GuestMemory, path: str, bz: BzImage) -> _Kernel:
    hdr = bz.header
    footprint = max(hdr.init_size, len(bz.kernel))
    if hdr.relocatable:
        candidates = [hdr.pref_address, _align_up(layout.HIMEM_START, hdr.kernel_alignment)]
    else:
        candidates = [hdr.code32_start or layout.HIMEM_START]
    base = next((c for c in candidates if c and memory.is_ram(c, footprint)), None)
    if base is None:
        raise ImageError(f"{path}: kernel needs {_mib(footprint)} from 0x{candidates[-1]:x} "
                         f"but the guest has only {memory.size >> 20} MiB of RAM")
    memory.write(base, bz.kernel)
    if hdr.is_64bit:
        entry, long_mode = base + PROTECTED_MODE_ENTRY_64, True
    else:
        entry, long_mode = base, False
    return _Kernel(low=base, high=base + footprint, entry=entry, long_mode=long_mode,
                   header=hdr, header_bytes=bz.header_bytes, protocol="linux-bzimage",
                   code32_start=base)


def _load_kernel(memory: GuestMemory, config: VmConfig, path: str, image: bytes) -> _Kernel:
    if looks_like_bzimage(image):
        try:
            bz = parse_bzimage(image)
        except ImageError as e:
            raise ImageError(f"{path}: {e}") from None
        if config.host_decompress and bz.header.is_64bit:
            try:
                fmt = detect_format(bz.payload)
            except ImageError as e:
                raise ImageError(f"{path}: {e}") from None
            if fmt in SUPPORTED_FORMATS:
                try:
                    vmlinux = decompress_payload(bz.payload)
                except ImageError as e:
                    raise ImageError(f"{path}: {e}") from None
                if not is_elf(vmlinux):
                    raise ImageError(f"{path}: the {fmt} payload does not hold an ELF vmlinux")
                return _load_elf_kernel(memory, path, vmlinux, bz.header, bz.header_bytes,
                                        f"linux-elf (host-decompressed {fmt})")
            log.warning("%s: %s payload cannot be decompressed here; booting the bzImage", path, fmt)
        return _load_bzimage_kernel(memory, path, bz)
    if is_elf(image):
        try:
            is64 = parse_elf(image).is_64bit
        except ImageError as e:
            raise ImageError(f"{path}: {e}") from None
        return _load_elf_kernel(memory, path, image, synthesize_header(is_64bit=is64), None, "linux-elf")
    raise ImageError(f"{path}: not a bzImage or ELF vmlinux")


def place_initrd(memory: GuestMemory, size: int, addr_max: int,
                 kernel: tuple[int, int]) -> int | None:
    """The page-aligned address, as high as possible, where an initrd of
    `size` bytes fits in RAM below min(addr_max + 1, 4 GiB) without touching
    the kernel range [low, high); None when there is none."""
    top = min(addr_max + 1, _low_ram_top(memory))
    k_low, k_high = kernel
    addr = (top - size) & ~(PAGE - 1)
    if addr < k_high and addr + size > k_low:
        addr = (min(k_low, top) - size) & ~(PAGE - 1)      # try below the kernel
    if addr < layout.HIMEM_START or addr + size > top or (addr < k_high and addr + size > k_low):
        return None
    return addr


def load_linux(memory: GuestMemory, config: VmConfig, image: bytes | None = None) -> BootResult:
    """Loads config.kernel, config.initrd[0] and config.cmdline for a Linux boot.

    `image` is the kernel file's contents when the caller has read it already.
    Raises ConfigError for a missing or unreadable file, ImageError for an
    image that is not a usable kernel, does not fit in RAM, or a command line
    longer than the kernel accepts; messages name the file."""
    if not config.kernel:
        raise ConfigError("no kernel image given")
    path = str(config.kernel)
    if image is None:
        image = read_image(path, "kernel")
    initrd = read_image(config.initrd[0], "initrd") if config.initrd else None
    if len(config.initrd) > 1:
        log.warning("Linux takes one initrd; ignoring %s", ", ".join(config.initrd[1:]))

    k = _load_kernel(memory, config, path, image)
    hdr = k.header

    cmdline = " ".join(filter(None, (config.cmdline, config.linux_cmdline_extra))).encode()
    limit = min(hdr.cmdline_size or 255, layout.CMDLINE_MAX - 1)
    if len(cmdline) > limit:
        raise ImageError(f"{path}: command line is {len(cmdline)} bytes, the kernel takes at most {limit}")
    memory.write(layout.CMDLINE_ADDR, cmdline + b"\0")

    rd = None
    if initrd is not None:
        addr_max = hdr.initrd_addr_max or layout.INITRD_ADDR_MAX
        at = place_initrd(memory, len(initrd), addr_max, (k.low, max(k.high, k.low + hdr.init_size)))
        if at is None:
            raise ImageError(f"{config.initrd[0]}: initrd of {_mib(len(initrd))} does not fit in "
                             f"{memory.size >> 20} MiB of RAM beside the kernel "
                             f"(0x{k.low:x}-0x{k.high:x}, below 0x{addr_max + 1:x})")
        memory.write(at, initrd)
        rd = (at, len(initrd))

    zero_page = build_zero_page(hdr, header_bytes=k.header_bytes, cmdline_addr=layout.CMDLINE_ADDR,
                                e820=layout.e820_map(memory.ram_ranges()), initrd=rd,
                                code32_start=k.code32_start)
    memory.write(layout.ZERO_PAGE_ADDR, zero_page)

    cpu: CpuState = long_mode_64(memory, k.entry) if k.long_mode else protected_mode_32(memory, k.entry)
    cpu.regs["rsi"] = layout.ZERO_PAGE_ADDR

    parts = [f"kernel 0x{k.low:x}-0x{k.high:x} entry 0x{k.entry:x} ({'64' if k.long_mode else '32'}-bit)"]
    if rd:
        parts.append(f"initrd 0x{rd[0]:x}+{rd[1]}")
    parts.append(f"cmdline {len(cmdline)} bytes at 0x{layout.CMDLINE_ADDR:x}")
    parts.append(f"zero page 0x{layout.ZERO_PAGE_ADDR:x}")
    summary = f"{path} [{k.protocol}]: " + ", ".join(parts)
    log.debug(summary)
    return BootResult(cpu=cpu, protocol=k.protocol, summary=summary)
