"""Linux boot_params (the "zero page"), built as data.

Offsets from Documentation/arch/x86/zero-page.rst; the setup header inside it
(at 0x1F1) is the one of bzimage.py.  The page is built in a bytearray and
written to guest memory by the caller.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from ..errors import ImageError
from .bzimage import (BOOT_FLAG, CAN_USE_HEAP, HDRS_MAGIC, LOADED_HIGH, SETUP_HEADER_OFFSET,
                      XLF_CAN_BE_LOADED_ABOVE_4G, XLF_KERNEL_64, SetupHeader)

log = logging.getLogger(__name__)

ZERO_PAGE_SIZE = 4096
LOADER_TYPE_UNDEFINED = 0xFF     # type_of_loader for a boot loader without an assigned id
SYNTH_VERSION = 0x020F           # protocol version a synthesised header claims
COMMAND_LINE_SIZE = 2048         # x86 kernels' buffer; cmdline_size is one less
E820_MAX_ENTRIES = 128
E820_ENTRY = struct.Struct("<QQI")   # addr, size, type: 20 bytes

# boot_params fields outside the setup header: name -> (offset, struct code).
BOOT_PARAMS_FIELDS: dict[str, tuple[int, str]] = {
    "tboot_addr": (0x058, "Q"),
    "acpi_rsdp_addr": (0x070, "Q"),
    "ext_ramdisk_image": (0x0C0, "I"),
    "ext_ramdisk_size": (0x0C4, "I"),
    "ext_cmd_line_ptr": (0x0C8, "I"),
    "cc_blob_address": (0x13C, "I"),
    "alt_mem_k": (0x1E0, "I"),
    "scratch": (0x1E4, "I"),
    "e820_entries": (0x1E8, "B"),
    "eddbuf_entries": (0x1E9, "B"),
    "edd_mbr_sig_buf_entries": (0x1EA, "B"),
    "kbd_status": (0x1EB, "B"),
    "secure_boot": (0x1EC, "B"),
    "sentinel": (0x1EF, "B"),
}
E820_TABLE_OFFSET = 0x2D0
SETUP_HEADER_LIMIT = 0x290       # edd_mbr_sig_buffer follows the header area


def synthesize_header(*, is_64bit: bool = True, init_size: int = 0,
                      kernel_alignment: int = 0x200000) -> SetupHeader:
    """A setup header for a kernel that has none (a bare vmlinux ELF)."""
    return SetupHeader(
        boot_flag=BOOT_FLAG, header=HDRS_MAGIC, version=SYNTH_VERSION,
        type_of_loader=LOADER_TYPE_UNDEFINED, loadflags=LOADED_HIGH | CAN_USE_HEAP,
        heap_end_ptr=0xFE00 - 0x200, vid_mode=0xFFFF, code32_start=0x100000,
        initrd_addr_max=0x7FFFFFFF, kernel_alignment=kernel_alignment, relocatable_kernel=1,
        xloadflags=(XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G) if is_64bit else 0,
        cmdline_size=COMMAND_LINE_SIZE - 1, init_size=init_size)


@dataclass
class ZeroPage:
    """A boot_params page under construction (or read back, for tests)."""
    data: bytearray

    @classmethod
    def new(cls, header_bytes: bytes | None = None) -> "ZeroPage":
        """An empty page; `header_bytes` (the bzImage's bytes from 0x1F1 to the
        end of its header) are copied in as the boot protocol asks."""
        zp = cls(bytearray(ZERO_PAGE_SIZE))
        if header_bytes:
            n = min(len(header_bytes), SETUP_HEADER_LIMIT - SETUP_HEADER_OFFSET)
            zp.data[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + n] = header_bytes[:n]
        return zp

    @classmethod
    def from_bytes(cls, data: bytes) -> "ZeroPage":
        if len(data) != ZERO_PAGE_SIZE:
            raise ImageError(f"a zero page is {ZERO_PAGE_SIZE} bytes, not {len(data)}")
        return cls(bytearray(data))

    def __getitem__(self, name: str) -> int:
        off, code = BOOT_PARAMS_FIELDS[name]
        return struct.unpack_from("<" + code, self.data, off)[0]

    def __setitem__(self, name: str, value: int) -> None:
        off, code = BOOT_PARAMS_FIELDS[name]
        struct.pack_into("<" + code, self.data, off, value)

    @property
    def header(self) -> SetupHeader:
        return SetupHeader.unpack_from(self.data)

    @header.setter
    def header(self, hdr: SetupHeader) -> None:
        hdr.pack_into(self.data)

    def set_e820(self, entries: list[tuple[int, int, int]]) -> None:
        """Raises ImageError for more than 128 entries."""
        if len(entries) > E820_MAX_ENTRIES:
            raise ImageError(f"{len(entries)} e820 entries do not fit the zero page (128 at most)")
        for i, (addr, size, typ) in enumerate(entries):
            E820_ENTRY.pack_into(self.data, E820_TABLE_OFFSET + i * E820_ENTRY.size, addr, size, typ)
        self["e820_entries"] = len(entries)

    def e820(self) -> list[tuple[int, int, int]]:
        return [E820_ENTRY.unpack_from(self.data, E820_TABLE_OFFSET + i * E820_ENTRY.size)
                for i in range(self["e820_entries"])]

    @property
    def cmd_line_ptr(self) -> int:
        return self.header.cmd_line_ptr | (self["ext_cmd_line_ptr"] << 32)

    @property
    def ramdisk(self) -> tuple[int, int]:
        """(address, size) of the initrd, 64-bit values."""
        h = self.header
        return (h.ramdisk_image | (self["ext_ramdisk_image"] << 32),
                h.ramdisk_size | (self["ext_ramdisk_size"] << 32))

    def __repr__(self) -> str:
        h = self.header
        return (f"ZeroPage(version={h.version_text}, loader=0x{h.type_of_loader:x}, "
                f"cmdline=0x{self.cmd_line_ptr:x}, ramdisk={self.ramdisk}, e820={self['e820_entries']})")


def build_zero_page(header: SetupHeader, *, header_bytes: bytes | None = None,
                    cmdline_addr: int, e820: list[tuple[int, int, int]],
                    initrd: tuple[int, int] | None = None, code32_start: int | None = None,
                    acpi_rsdp_addr: int = 0) -> bytes:
    """The 4096-byte boot_params for a kernel with setup header `header`.

    `header_bytes`, when given, are the image's raw header bytes, copied
    first so that fields pyvmm does not know survive; `header` then overrides
    the known ones.  Raises ImageError when the e820 map is too long."""
    zp = ZeroPage.new(header_bytes)
    rd_addr, rd_size = initrd or (0, 0)
    hdr = header.replace(
        type_of_loader=LOADER_TYPE_UNDEFINED,
        loadflags=header.loadflags | CAN_USE_HEAP,
        heap_end_ptr=0xFE00 - 0x200,
        ext_loader_ver=0, ext_loader_type=0,
        cmd_line_ptr=cmdline_addr & 0xFFFFFFFF,
        ramdisk_image=rd_addr & 0xFFFFFFFF,
        ramdisk_size=rd_size & 0xFFFFFFFF,
        hardware_subarch=0, hardware_subarch_data=0, setup_data=0,
        code32_start=header.code32_start if code32_start is None else code32_start)
    zp.header = hdr
    zp["ext_cmd_line_ptr"] = cmdline_addr >> 32
    zp["ext_ramdisk_image"] = rd_addr >> 32
    zp["ext_ramdisk_size"] = rd_size >> 32
    zp["acpi_rsdp_addr"] = acpi_rsdp_addr
    zp["sentinel"] = 0
    zp.set_e820(e820)
    # Old kernels size memory from alt_mem_k: KiB of RAM above 1 MiB.
    top = max((a + s for a, s, t in e820 if t == 1), default=0)
    zp["alt_mem_k"] = min(max(top - 0x100000, 0) >> 10, 0xFFFFFFFF)
    log.debug("built %r", zp)
    return bytes(zp.data)
