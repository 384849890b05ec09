"""QEMU's firmware configuration interface (fw_cfg), x86 port-I/O flavour.

Offsets inside the device's 12-port range (the builder puts it at 0x510):

    0x0  selector, 16-bit write: picks an item and rewinds its read offset
    0x1  data, byte reads: the selected item's bytes, auto-advancing; 0 past the end
    0x4  DMA address, high 32 bits, big-endian (reads give "QEMU CFG")
    0x8  DMA address, low 32 bits, big-endian; writing it starts the transfer

A DMA transfer reads a FWCfgDmaAccess {be32 control, be32 length, be64
address} from guest memory, performs it (select, then read/skip/write) and
writes the control word back: 0 on success, the error bit on failure.

Items are read-only; the file directory (item 0x19) lists the user files at
selectors 0x20 and up.
"""

from __future__ import annotations

import logging
import struct

from ..device import as_int, restore_state, saved
from ..errors import ConfigError, GuestMemoryError
from ..memory import GuestMemory

log = logging.getLogger(__name__)

# Item selectors.
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_KERNEL_CMDLINE = 0x09
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_DEVICE = 0x0C
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16     # a bzImage's real-mode part, for the firmware's Linux loader
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_SETUP_DATA = 0x18
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000  # selector flag: ignored, items are read-only

ID_TRADITIONAL = 1 << 0
ID_DMA = 1 << 1

# Port offsets.
SELECTOR_OFFSET = 0x0
DATA_OFFSET = 0x1
DMA_OFFSET = 0x4
PORT_RANGE = 12
DMA_SIGNATURE = b"QEMU CFG"

# DMA control bits.
DMA_ERROR = 1 << 0
DMA_READ = 1 << 1
DMA_SKIP = 1 << 2
DMA_SELECT = 1 << 3
DMA_WRITE = 1 << 4
DMA_ACCESS = struct.Struct(">IIQ")  # control, length, address

FILE_NAME_MAX = 56
FILE_ENTRY = struct.Struct(">IHH56s")  # size, select, reserved, name


class FwCfg:
    """The fw_cfg device.  Constructor data becomes the read-only items.

    `files` are (name, contents) pairs, e.g. ("opt/pyvmm/test", b"..."), at
    selectors 0x20 and up in the given order; `memory` enables DMA (None: no
    DMA, ID bit 1 clear).  The kernel/initrd/setup items are present only
    when the matching arguments are given.

    Raises ConfigError for a file name longer than 55 bytes or duplicated."""

    STATE_VERSION = 1

    def __init__(self, ram_size: int, cpus: int, *, max_cpus: int | None = None,
                 cmdline: str = "", files: list[tuple[str, bytes]] | None = None,
                 memory: GuestMemory | None = None,
                 kernel: tuple[int, bytes] | None = None,
                 initrd: tuple[int, bytes] | None = None,
                 kernel_entry: int | None = None, cmdline_addr: int | None = None,
                 setup: tuple[int, bytes] | None = None):
        self.memory = memory
        self.items: dict[int, bytes] = {}
        self.file_names: dict[str, int] = {}
        ident = ID_TRADITIONAL | (ID_DMA if memory is not None else 0)
        self.items[FW_CFG_SIGNATURE] = b"QEMU"
        self.items[FW_CFG_ID] = struct.pack("<I", ident)
        self.items[FW_CFG_UUID] = bytes(16)
        self.items[FW_CFG_RAM_SIZE] = struct.pack("<Q", ram_size)
        self.items[FW_CFG_NOGRAPHIC] = struct.pack("<H", 1)
        self.items[FW_CFG_NB_CPUS] = struct.pack("<H", cpus)
        self.items[FW_CFG_MAX_CPUS] = struct.pack("<H", max_cpus if max_cpus is not None else cpus)
        cmd = cmdline.encode() + b"\0" if cmdline else b""
        self.items[FW_CFG_CMDLINE_SIZE] = struct.pack("<I", len(cmd))
        self.items[FW_CFG_CMDLINE_DATA] = cmd
        if cmdline_addr is not None:
            self.items[FW_CFG_KERNEL_CMDLINE] = struct.pack("<I", cmdline_addr)
            self.items[FW_CFG_CMDLINE_ADDR] = struct.pack("<I", cmdline_addr)
        if kernel is not None:
            self.items[FW_CFG_KERNEL_ADDR] = struct.pack("<I", kernel[0])
            self.items[FW_CFG_KERNEL_SIZE] = struct.pack("<I", len(kernel[1]))
            self.items[FW_CFG_KERNEL_DATA] = bytes(kernel[1])
        if setup is not None:
            self.items[FW_CFG_SETUP_ADDR] = struct.pack("<I", setup[0])
            self.items[FW_CFG_SETUP_SIZE] = struct.pack("<I", len(setup[1]))
            self.items[FW_CFG_SETUP_DATA] = bytes(setup[1])
        if kernel_entry is not None:
            self.items[FW_CFG_KERNEL_ENTRY] = struct.pack("<I", kernel_entry)
        if initrd is not None:
            self.items[FW_CFG_INITRD_ADDR] = struct.pack("<I", initrd[0])
            self.items[FW_CFG_INITRD_SIZE] = struct.pack("<I", len(initrd[1]))
            self.items[FW_CFG_INITRD_DATA] = bytes(initrd[1])
        entries = b""
        for i, (name, data) in enumerate(files or []):
            raw = name.encode()
            if len(raw) >= FILE_NAME_MAX:
                raise ConfigError(f"fw_cfg file name {name!r} is longer than {FILE_NAME_MAX - 1} bytes")
            if name in self.file_names:
                raise ConfigError(f"fw_cfg file {name!r} given twice")
            key = FW_CFG_FILE_FIRST + i
            self.file_names[name] = key
            self.items[key] = bytes(data)
            entries += FILE_ENTRY.pack(len(data), key, 0, raw)
        self.items[FW_CFG_FILE_DIR] = struct.pack(">I", len(files or [])) + entries
        self.selector = 0
        self.offset = 0
        self.dma_high = 0
        self.dma_transfers = 0

    def __repr__(self) -> str:
        return (f"FwCfg(selector=0x{self.selector:x}, offset={self.offset}, "
                f"{len(self.file_names)} files, dma={'on' if self.memory is not None else 'off'})")

    # -- registers ----------------------------------------------------------
    def _select(self, key: int) -> None:
        self.selector = key & ~FW_CFG_WRITE_CHANNEL & 0xFFFF
        self.offset = 0

    def _data_byte(self) -> int:
        item = self.items.get(self.selector, b"")
        if self.offset < len(item):
            value = item[self.offset]
            self.offset += 1
            return value
        return 0

    def read(self, offset: int, size: int) -> int:
        if offset == DATA_OFFSET:
            # Wider reads return consecutive bytes in memory order.
            return int.from_bytes(bytes(self._data_byte() for _ in range(size)), "little")
        if DMA_OFFSET <= offset < DMA_OFFSET + len(DMA_SIGNATURE) and self.memory is not None:
            start = offset - DMA_OFFSET
            chunk = DMA_SIGNATURE[start:start + size].ljust(size, b"\0")
            return int.from_bytes(chunk, "little")
        return (1 << (8 * size)) - 1 if offset != SELECTOR_OFFSET else 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == SELECTOR_OFFSET:
            self._select(value & 0xFFFF)
        elif self.memory is None:
            return
        elif offset == DMA_OFFSET and size == 4:
            self.dma_high = int.from_bytes(value.to_bytes(4, "little"), "big")
        elif offset == DMA_OFFSET + 4 and size == 4:
            low = int.from_bytes(value.to_bytes(4, "little"), "big")
            self._dma((self.dma_high << 32) | low)
            self.dma_high = 0
        elif offset == DMA_OFFSET and size == 8:
            self._dma(int.from_bytes(value.to_bytes(8, "little"), "big"))

    # -- DMA ----------------------------------------------------------------
    def _dma(self, addr: int) -> None:
        """Runs one FWCfgDmaAccess at guest address addr; a bad descriptor
        address is ignored, a bad buffer sets the error bit."""
        assert self.memory is not None
        self.dma_transfers += 1
        try:
            control, length, buf = DMA_ACCESS.unpack(self.memory.read(addr, DMA_ACCESS.size))
        except GuestMemoryError:
            log.debug("fw_cfg DMA descriptor at 0x%x is outside RAM", addr)
            return
        status = 0
        if control & DMA_SELECT:
            self._select(control >> 16)
        item = self.items.get(self.selector, b"")
        try:
            if control & DMA_WRITE:
                status = DMA_ERROR  # every item is read-only
            elif control & DMA_READ:
                chunk = item[self.offset:self.offset + length]
                if length:
                    self.memory.write(buf, chunk.ljust(length, b"\0"))
                self.offset = min(len(item), self.offset + length)
            elif control & DMA_SKIP:
                self.offset = min(len(item), self.offset + length)
        except GuestMemoryError:
            status = DMA_ERROR
        self.memory.write(addr, struct.pack(">I", status))

    # -- lifecycle ----------------------------------------------------------
    def reset(self) -> None:
        self.selector = 0
        self.offset = 0
        self.dma_high = 0

    def save(self) -> dict:
        return saved(self, {"selector": self.selector, "offset": self.offset,
                            "dma_high": self.dma_high})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        self.selector = as_int(state["selector"])
        self.offset = as_int(state["offset"])
        self.dma_high = as_int(state["dma_high"])
