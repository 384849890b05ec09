"""One PCI function's configuration space: a type-0 header, up to six BARs
and a capabilities list.

The function knows nothing of where it sits: the host bridge (host.py)
reads and writes its config space, and is told through `on_decode_change`
when the guest reprograms a BAR or the command register, so that it can
move the BAR's range on the I/O or MMIO bus.

Writable bits are kept in a mask beside the 256 config bytes, so a guest
write can only change what real hardware lets it change: the command
register's decode/master/INTx-disable bits, cache line size, latency timer,
interrupt line and the address bits of each BAR (a BAR of size S ignores
writes to its low log2(S) bits, which is how the guest sizes it).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Callable

from ...device import Registers, as_hex, restore_state, saved
from ...errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_SIZE = 256

# Type-0 header offsets (PCI Local Bus spec 3.0, section 6.1).
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION_ID, CLASS_PROG = 0x08, 0x09
CACHE_LINE_SIZE, LATENCY_TIMER, HEADER_TYPE = 0x0C, 0x0D, 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID = 0x2C, 0x2E
CAPABILITIES_PTR = 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
FIRST_CAPABILITY = 0x40

CMD_IO, CMD_MEMORY, CMD_MASTER, CMD_INTX_DISABLE = 1 << 0, 1 << 1, 1 << 2, 1 << 10
STATUS_INTERRUPT, STATUS_CAP_LIST = 1 << 3, 1 << 4

BAR_IO, BAR_MEM64, BAR_PREFETCH = 0x1, 0x4, 0x8
BAR_KINDS = ("io", "mem32", "mem64")


@dataclass
class Bar:
    """A BAR: its register index, size (a power of two), kind and the
    device its range dispatches to."""
    index: int
    size: int
    kind: str
    device: Registers
    prefetchable: bool = False

    @property
    def flags(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.kind == "io":
            return BAR_IO
        return (BAR_MEM64 if self.kind == "mem64" else 0) | (BAR_PREFETCH if self.prefetchable else 0)


class PciFunction:
    """Config space of one function (header type 0).

    Subclasses (the virtio transport) add BARs with add_bar() and
    capabilities with add_capability() before the function is attached to a
    host bridge."""

    STATE_VERSION = 1

    def __init__(self, vendor: int, device: int, class_code: int, *, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem: int = 0, interrupt_pin: int = 1):
        self.config = bytearray(CONFIG_SIZE)
        self.writable = bytearray(CONFIG_SIZE)
        self.bars: list[Bar | None] = [None] * 6
        self._taken: set[int] = set()      # BAR registers in use (a 64-bit BAR takes two)
        self._cap_tail = CAPABILITIES_PTR   # where the next capability's offset goes
        self._cap_free = FIRST_CAPABILITY
        # Called with no argument after a write that may move or (un)map a BAR.
        self.on_decode_change: Callable[[], None] | None = None
        struct.pack_into("<HH", self.config, VENDOR_ID, vendor, device)
        struct.pack_into("<I", self.config, REVISION_ID, (class_code << 8) | revision)
        struct.pack_into("<HH", self.config, SUBSYSTEM_VENDOR_ID, subsystem_vendor, subsystem)
        self.config[INTERRUPT_PIN] = interrupt_pin
        self._set_mask(COMMAND, 2, CMD_IO | CMD_MEMORY | CMD_MASTER | CMD_INTX_DISABLE)
        self._set_mask(CACHE_LINE_SIZE, 2, 0xFFFF)
        self._set_mask(INTERRUPT_LINE, 1, 0xFF)
        self._initial = bytes(self.config)

    def __repr__(self) -> str:
        vendor, device = struct.unpack_from("<HH", self.config, VENDOR_ID)
        return f"{type(self).__name__}({vendor:04x}:{device:04x}, command={self.command:#x})"

    def _set_mask(self, offset: int, size: int, mask: int) -> None:
        self.writable[offset:offset + size] = mask.to_bytes(size, "little")

    # --- building ----------------------------------------------------------------

    def add_bar(self, index: int, size: int, kind: str, device: Registers,
                prefetchable: bool = False) -> Bar:
        """Declares BAR `index`. Raises ConfigError for a size that is not a
        power of two (at least 16 bytes of memory or 4 ports), a bad kind or
        a register already taken (a 64-bit BAR takes two)."""
        if kind not in BAR_KINDS:
            raise ConfigError(f"PCI BAR kind {kind!r} (choose from {', '.join(BAR_KINDS)})")
        least = 4 if kind == "io" else 16
        if size < least or size & (size - 1) or (kind != "mem64" and size > 1 << 31):
            raise ConfigError(f"PCI BAR size {size:#x} is not a power of two of at least {least}")
        last = index + (1 if kind == "mem64" else 0)
        if not 0 <= index or last > 5 or self._taken & set(range(index, last + 1)):
            raise ConfigError(f"PCI BAR {index} is taken or out of range")
        self._taken.update(range(index, last + 1))
        bar = Bar(index, size, kind, device, prefetchable)
        self.bars[index] = bar
        offset = BAR0 + 4 * index
        struct.pack_into("<I", self.config, offset, bar.flags)
        self._set_mask(offset, 4, ~(size - 1) & 0xFFFFFFFF & ~0xF if kind != "io" else ~(size - 1) & 0xFFFFFFFC)
        if kind == "mem64":
            self._set_mask(offset + 4, 4, 0xFFFFFFFF if size <= 1 << 32 else ~((size >> 32) - 1) & 0xFFFFFFFF)
        self._initial = bytes(self.config)
        return bar

    def add_capability(self, cap_id: int, body: bytes, writable: bytes = b"") -> int:
        """Appends a capability (`body` follows the id and next bytes) and
        returns its config offset; `writable` masks the guest-writable bits
        of the body (none when empty). Raises ConfigError when it does not fit."""
        offset = self._cap_free
        length = (2 + len(body) + 3) & ~3
        if offset + length > CONFIG_SIZE:
            raise ConfigError("PCI capabilities do not fit in 256 bytes of config space")
        self.config[offset] = cap_id
        self.config[offset + 2:offset + 2 + len(body)] = body
        self.writable[offset + 2:offset + 2 + len(writable)] = writable
        self.config[self._cap_tail] = offset
        self._cap_tail = offset + 1
        self._cap_free = offset + length
        struct.pack_into("<H", self.config, STATUS, self.status | STATUS_CAP_LIST)
        self._initial = bytes(self.config)
        return offset

    def add_register(self, offset: int, size: int, value: int, writable: int) -> None:
        """A device-specific register (offset 0x40 and up) with its value
        after reset and the bits the guest may change."""
        struct.pack_into("<" + {1: "B", 2: "H", 4: "I"}[size], self.config, offset, value)
        self._set_mask(offset, size, writable)
        self._initial = bytes(self.config)

    # --- what the host bridge asks ---------------------------------------------------

    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self.config, COMMAND)[0]

    @property
    def status(self) -> int:
        return struct.unpack_from("<H", self.config, STATUS)[0]

    def bar_address(self, bar: Bar) -> int:
        """The address the guest programmed, low flag bits stripped."""
        offset = BAR0 + 4 * bar.index
        low = struct.unpack_from("<I", self.config, offset)[0]
        if bar.kind == "io":
            return low & ~0x3
        addr = low & ~0xF
        if bar.kind == "mem64":
            addr |= struct.unpack_from("<I", self.config, offset + 4)[0] << 32
        return addr

    def set_bar_address(self, bar: Bar, addr: int) -> None:
        """Places the BAR (as firmware would) without telling the bridge."""
        offset = BAR0 + 4 * bar.index
        struct.pack_into("<I", self.config, offset, (addr & 0xFFFFFFFF) | bar.flags)
        if bar.kind == "mem64":
            struct.pack_into("<I", self.config, offset + 4, addr >> 32)

    def decoding(self, bar: Bar) -> bool:
        """Whether the command register lets the BAR's range respond."""
        return bool(self.command & (CMD_IO if bar.kind == "io" else CMD_MEMORY))

    def set_interrupt_status(self, asserted: bool) -> None:
        """Mirrors the INTx level in the status register's interrupt bit."""
        status = self.status & ~STATUS_INTERRUPT | (STATUS_INTERRUPT if asserted else 0)
        struct.pack_into("<H", self.config, STATUS, status)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & CMD_INTX_DISABLE)

    # --- config space accesses -------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        """Reads 1, 2 or 4 bytes; bytes past the end read as all-ones."""
        data = bytes(self.config[offset:offset + size])
        return int.from_bytes(data + b"\xff" * (size - len(data)), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Writes the bits the mask lets through; tells the bridge when the
        command register or a BAR changed."""
        end = min(offset + size, CONFIG_SIZE)
        changed = False
        for i in range(offset, end):
            byte = (value >> (8 * (i - offset))) & 0xFF
            mask = self.writable[i]
            new = (self.config[i] & ~mask) | (byte & mask)
            if new != self.config[i]:
                self.config[i] = new
                changed = True
        if changed and (offset < BAR0 + 24 and end > BAR0 or offset < COMMAND + 2 and end > COMMAND):
            if self.on_decode_change is not None:
                self.on_decode_change()

    # --- contract ---------------------------------------------------------------------

    def reset(self) -> None:
        self.config[:] = self._initial
        if self.on_decode_change is not None:
            self.on_decode_change()

    def save(self) -> dict:
        return saved(self, {"config": bytes(self.config).hex()})

    def restore(self, state: dict) -> None:
        def load(s: dict) -> None:
            config = as_hex(s["config"])
            if len(config) != CONFIG_SIZE:
                raise ValueError(f"config space of {len(config)} bytes")
            self.config[:] = config
            if self.on_decode_change is not None:
                self.on_decode_change()
        restore_state(self, state, load)


__all__ = ["PciFunction", "Bar", "CMD_IO", "CMD_MEMORY", "CMD_MASTER", "CMD_INTX_DISABLE"]
