"""The bzImage file format: the real-mode setup header and the parts it describes.

Offsets and meanings follow the Linux x86 boot protocol
(Documentation/arch/x86/boot.rst).  A bzImage is the setup sectors (the boot
sector plus `setup_sects` more 512-byte sectors) followed by the
protected-mode kernel; the compressed vmlinux ("payload") sits inside the
protected-mode kernel at `payload_offset`.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from dataclasses import dataclass

from ..errors import ImageError

log = logging.getLogger(__name__)

SECTOR = 512
SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448          # "HdrS" as a little-endian u32
MIN_VERSION = 0x0206             # cmdline_size and relocation appear in 2.06
DEFAULT_SETUP_SECTS = 4          # setup_sects == 0 means 4
PROTECTED_MODE_ENTRY_64 = 0x200  # 64-bit entry, relative to the load address

# loadflags
LOADED_HIGH = 0x01
KASLR_FLAG = 0x02
QUIET_FLAG = 0x20
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80

# xloadflags
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
XLF_EFI_HANDOVER_32 = 0x04
XLF_EFI_HANDOVER_64 = 0x08
XLF_EFI_KEXEC = 0x10

# The setup header, as (field, struct code), starting at file offset 0x1F1.
SETUP_HEADER_LAYOUT: tuple[tuple[str, str], ...] = (
    ("setup_sects", "B"),             # 0x1F1
    ("root_flags", "H"),              # 0x1F2
    ("syssize", "I"),                 # 0x1F4  protected-mode size in 16-byte units
    ("ram_size", "H"),                # 0x1F8
    ("vid_mode", "H"),                # 0x1FA
    ("root_dev", "H"),                # 0x1FC
    ("boot_flag", "H"),               # 0x1FE  0xAA55
    ("jump", "H"),                    # 0x200  short jump; its byte 0x201 gives the header end
    ("header", "I"),                  # 0x202  "HdrS"
    ("version", "H"),                 # 0x206
    ("realmode_swtch", "I"),          # 0x208
    ("start_sys_seg", "H"),           # 0x20C
    ("kernel_version", "H"),          # 0x20E
    ("type_of_loader", "B"),          # 0x210
    ("loadflags", "B"),               # 0x211
    ("setup_move_size", "H"),         # 0x212
    ("code32_start", "I"),            # 0x214
    ("ramdisk_image", "I"),           # 0x218
    ("ramdisk_size", "I"),            # 0x21C
    ("bootsect_kludge", "I"),         # 0x220
    ("heap_end_ptr", "H"),            # 0x224
    ("ext_loader_ver", "B"),          # 0x226
    ("ext_loader_type", "B"),         # 0x227
    ("cmd_line_ptr", "I"),            # 0x228
    ("initrd_addr_max", "I"),         # 0x22C
    ("kernel_alignment", "I"),        # 0x230
    ("relocatable_kernel", "B"),      # 0x234
    ("min_alignment", "B"),           # 0x235
    ("xloadflags", "H"),              # 0x236
    ("cmdline_size", "I"),            # 0x238
    ("hardware_subarch", "I"),        # 0x23C
    ("hardware_subarch_data", "Q"),   # 0x240
    ("payload_offset", "I"),          # 0x248
    ("payload_length", "I"),          # 0x24C
    ("setup_data", "Q"),              # 0x250
    ("pref_address", "Q"),            # 0x258
    ("init_size", "I"),               # 0x260
    ("handover_offset", "I"),         # 0x264
    ("kernel_info_offset", "I"),      # 0x268
)
SETUP_HEADER_STRUCT = struct.Struct("<" + "".join(code for _, code in SETUP_HEADER_LAYOUT))
SETUP_HEADER_END = SETUP_HEADER_OFFSET + SETUP_HEADER_STRUCT.size   # 0x26C


@dataclass
class SetupHeader:
    """The fields of the setup header (names as in the boot protocol)."""
    setup_sects: int = 0
    root_flags: int = 0
    syssize: int = 0
    ram_size: int = 0
    vid_mode: int = 0
    root_dev: int = 0
    boot_flag: int = 0
    jump: int = 0
    header: int = 0
    version: int = 0
    realmode_swtch: int = 0
    start_sys_seg: int = 0
    kernel_version: int = 0
    type_of_loader: int = 0
    loadflags: int = 0
    setup_move_size: int = 0
    code32_start: int = 0
    ramdisk_image: int = 0
    ramdisk_size: int = 0
    bootsect_kludge: int = 0
    heap_end_ptr: int = 0
    ext_loader_ver: int = 0
    ext_loader_type: int = 0
    cmd_line_ptr: int = 0
    initrd_addr_max: int = 0
    kernel_alignment: int = 0
    relocatable_kernel: int = 0
    min_alignment: int = 0
    xloadflags: int = 0
    cmdline_size: int = 0
    hardware_subarch: int = 0
    hardware_subarch_data: int = 0
    payload_offset: int = 0
    payload_length: int = 0
    setup_data: int = 0
    pref_address: int = 0
    init_size: int = 0
    handover_offset: int = 0
    kernel_info_offset: int = 0

    @classmethod
    def unpack_from(cls, buf: bytes | bytearray | memoryview, offset: int = SETUP_HEADER_OFFSET) -> "SetupHeader":
        """Reads the header at `offset` (0x1F1 in a bzImage or a zero page).

        Raises struct.error when the buffer is too short."""
        values = SETUP_HEADER_STRUCT.unpack_from(buf, offset)
        return cls(**{name: v for (name, _), v in zip(SETUP_HEADER_LAYOUT, values)})

    def pack(self) -> bytes:
        return SETUP_HEADER_STRUCT.pack(*(getattr(self, name) for name, _ in SETUP_HEADER_LAYOUT))

    def pack_into(self, buf: bytearray, offset: int = SETUP_HEADER_OFFSET) -> None:
        SETUP_HEADER_STRUCT.pack_into(buf, offset, *(getattr(self, name) for name, _ in SETUP_HEADER_LAYOUT))

    def replace(self, **changes: int) -> "SetupHeader":
        return dataclasses.replace(self, **changes)

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def is_64bit(self) -> bool:
        """True when the kernel has a 64-bit entry point at load address + 0x200."""
        return bool(self.xloadflags & XLF_KERNEL_64)

    @property
    def relocatable(self) -> bool:
        return bool(self.relocatable_kernel)

    def __repr__(self) -> str:
        return (f"SetupHeader(version={self.version_text}, setup_sects={self.setup_sects}, "
                f"loadflags=0x{self.loadflags:x}, xloadflags=0x{self.xloadflags:x}, "
                f"pref_address=0x{self.pref_address:x}, init_size=0x{self.init_size:x})")


@dataclass
class BzImage:
    """A parsed bzImage: the header and views of its parts."""
    header: SetupHeader
    header_bytes: bytes    # raw header from 0x1F1 to its end (0x202 + byte at 0x201)
    setup: bytes           # boot sector + setup sectors (real-mode code)
    kernel: bytes          # protected-mode kernel (loaded at code32_start / pref_address)
    payload: bytes         # the compressed vmlinux inside `kernel`

    @property
    def setup_size(self) -> int:
        return len(self.setup)

    def __repr__(self) -> str:
        return (f"BzImage(version={self.header.version_text}, setup={len(self.setup)}, "
                f"kernel={len(self.kernel)}, payload={len(self.payload)})")


def looks_like_bzimage(data: bytes) -> bool:
    """True when the 'HdrS' magic sits at 0x202 (any boot protocol version)."""
    return len(data) >= 0x206 and data[0x202:0x206] == b"HdrS"


def parse_bzimage(data: bytes) -> BzImage:
    """Parses and checks a bzImage.

    Raises ImageError ("not a bzImage: ...", "truncated bzImage: ...", or a
    too-old boot protocol) with a one-line message."""
    if len(data) < 0x206:
        raise ImageError(f"not a bzImage: only {len(data)} bytes")
    if data[0x202:0x206] != b"HdrS":
        raise ImageError("not a bzImage: no 'HdrS' magic at offset 0x202")
    boot_flag = struct.unpack_from("<H", data, 0x1FE)[0]
    if boot_flag != BOOT_FLAG:
        raise ImageError(f"not a bzImage: boot flag 0x{boot_flag:04x} at 0x1fe is not 0xaa55")
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < MIN_VERSION:
        raise ImageError(f"boot protocol {version >> 8}.{version & 0xFF:02d} is too old "
                         f"(2.06 or later needed)")
    if len(data) < SETUP_HEADER_END:
        raise ImageError(f"truncated bzImage: {len(data)} bytes, the setup header alone "
                         f"needs {SETUP_HEADER_END}")
    hdr = SetupHeader.unpack_from(data)
    if not hdr.loadflags & LOADED_HIGH:
        raise ImageError("not a bzImage: a zImage (not LOADED_HIGH) is not supported")

    setup_sects = hdr.setup_sects or DEFAULT_SETUP_SECTS
    setup_size = (setup_sects + 1) * SECTOR
    if len(data) <= setup_size:
        raise ImageError(f"truncated bzImage: {len(data)} bytes, setup alone is {setup_size}")
    kernel = data[setup_size:]
    want = hdr.syssize * 16
    if want and len(kernel) + 15 < want:     # syssize counts 16-byte units, rounded up
        raise ImageError(f"truncated bzImage: protected-mode kernel is {len(kernel)} bytes, "
                         f"header says {want}")
    end = hdr.payload_offset + hdr.payload_length
    if hdr.payload_length == 0 or end > len(kernel):
        raise ImageError(f"truncated bzImage: payload 0x{hdr.payload_offset:x}+0x{hdr.payload_length:x} "
                         f"is outside the {len(kernel)}-byte kernel")
    header_end = min(0x202 + data[0x201], SETUP_HEADER_END)
    header_end = max(header_end, 0x206)
    bz = BzImage(header=hdr, header_bytes=bytes(data[SETUP_HEADER_OFFSET:header_end]),
                 setup=bytes(data[:setup_size]), kernel=bytes(kernel),
                 payload=bytes(kernel[hdr.payload_offset:end]))
    log.debug("parsed %r: %r", bz, hdr)
    return bz
