"""The PCI host bridge: bus 0, configuration mechanism #1 at ports
0xCF8/0xCFC (and ECAM, ecam.py), BAR placement and INTx routing.

Configuration mechanism #1 (PCI Local Bus spec 3.0, 3.2.2.3.2): the guest
writes an address dword to 0xCF8 (bit 31 enable, bus, device, function,
register) and then reads or writes 1, 2 or 4 bytes at 0xCFC..0xCFF.  Only
bus 0 exists; functions other than 0 and empty slots read as all-ones,
which is how the guest knows that nothing is there.

pyvmm places every BAR itself (as firmware would) in the windows below and
turns decoding on; when the guest later moves a BAR or turns decoding off,
the bridge moves the range on the Bus.  A BAR the guest moves onto a range
that is taken stays unmapped (logged) until it is moved again.

INTx: the function in slot S drives its INTA# on GSI 16 + S % 8 (IOAPIC
pins 16-23, level-triggered); aml.py describes the same routing in the
DSDT's _PRT so that Linux finds it through ACPI.
"""

from __future__ import annotations

import logging
from typing import Callable

from ...bus import Bus
from ...device import as_int, restore_state, saved
from ...errors import BusError, ConfigError
from .ecam import ECAM_BASE, ECAM_SIZE, PciEcam
from .function import CMD_IO, CMD_MEMORY, INTERRUPT_LINE, PciFunction

log = logging.getLogger(__name__)

CONFIG_ADDRESS_PORT, CONFIG_PORTS = 0xCF8, 8
ENABLE = 1 << 31
SLOTS = 32
INTEL, I440FX = 0x8086, 0x1237
CLASS_HOST_BRIDGE = 0x060000

# Where pyvmm places BARs: above the ECAM window and below the IOAPIC;
# ports above the legacy ISA range.
MMIO_WINDOW = (ECAM_BASE + ECAM_SIZE, 0xFEC00000)
IO_WINDOW = (0xC000, 0x10000)
FIRST_INTX_GSI, INTX_GSIS = 16, 8
# Port 0xCF9, the PIIX reset control register: bit 2 resets the CPU.
RESET_CONTROL, RESET_CPU = 1, 0x04


def intx_gsi(slot: int) -> int:
    """The GSI that slot `slot`'s INTA# is wired to."""
    return FIRST_INTX_GSI + slot % INTX_GSIS


class PciHostBridge:
    """Bus 0 with the host bridge itself in slot 0.  Sits on the I/O bus at
    0xCF8 (8 ports); moves BAR ranges on `io_bus` and `mmio_bus`."""

    STATE_VERSION = 1

    def __init__(self, io_bus: Bus, mmio_bus: Bus):
        self.io_bus = io_bus
        self.mmio_bus = mmio_bus
        self.address = 0
        # Called for a reset through port 0xCF9; None: such writes are ignored.
        self.on_reset: Callable[[], None] | None = None
        self.functions: dict[int, PciFunction] = {}
        self.names: dict[int, str] = {}
        self._mapped: dict[tuple[int, int], tuple[Bus, int]] = {}   # (slot, bar) -> (bus, base)
        self._next_mmio = MMIO_WINDOW[0]
        self._next_io = IO_WINDOW[0]
        self.host = PciFunction(INTEL, I440FX, CLASS_HOST_BRIDGE, interrupt_pin=0)
        self.functions[0] = self.host
        self.names[0] = "pci-host"
        self.ecam = None      # the PciEcam window attach_host_bridge adds

    def __repr__(self) -> str:
        return f"PciHostBridge({len(self.functions)} functions, address={self.address:#x})"

    # --- building ---------------------------------------------------------------------

    def add(self, function: PciFunction, name: str, slot: int | None = None) -> int:
        """Plugs `function` into `slot` (None: the first free one), places
        and maps its BARs and returns the slot. Raises ConfigError when the
        slot is taken, or the bus or a window is full."""
        if slot is not None and not 1 <= slot < SLOTS:
            raise ConfigError(f"PCI slot {slot} does not exist (1..{SLOTS - 1})")
        if slot in self.functions:
            raise ConfigError(f"PCI slot {slot} is not free (it holds {self.names[slot]})")
        if slot is None:
            slot = next((s for s in range(1, SLOTS) if s not in self.functions), None)
        if slot is None:
            raise ConfigError("PCI bus 0 has no free slot (31 devices at most)")
        for bar in function.bars:
            if bar is None:
                continue
            if bar.kind == "io":
                base = -(-self._next_io // bar.size) * bar.size
                if base + bar.size > IO_WINDOW[1]:
                    raise ConfigError(f"{name}: no room for a {bar.size}-port I/O BAR")
                self._next_io = base + bar.size
            else:
                base = -(-self._next_mmio // bar.size) * bar.size
                if base + bar.size > MMIO_WINDOW[1]:
                    raise ConfigError(f"{name}: no room for a {bar.size:#x}-byte MMIO BAR")
                self._next_mmio = base + bar.size
            function.set_bar_address(bar, base)
        function.config_write(4, 2, function.command | CMD_IO | CMD_MEMORY)
        function.config[INTERRUPT_LINE] = intx_gsi(slot)   # interrupt line, as firmware fills it in
        function._initial = bytes(function.config)
        self.functions[slot] = function
        self.names[slot] = name
        function.on_decode_change = lambda slot=slot: self.remap(slot)
        self.remap(slot)
        return slot

    def remap(self, slot: int) -> None:
        """Puts each BAR of the function in `slot` where its registers say,
        or takes it off the bus while it does not decode."""
        function = self.functions[slot]
        for bar in function.bars:
            if bar is None:
                continue
            bus = self.io_bus if bar.kind == "io" else self.mmio_bus
            addr = function.bar_address(bar)
            limit = 1 << 16 if bar.kind == "io" else 1 << 64
            want = (bus, addr) if function.decoding(bar) and addr and addr + bar.size <= limit else None
            key = (slot, bar.index)
            have = self._mapped.get(key)
            if have == want:
                continue
            if have is not None:
                have[0].remove(have[1])
                del self._mapped[key]
            if want is None:
                continue
            try:
                bus.insert(addr, bar.size, bar.device, f"{self.names[slot]}-bar{bar.index}")
            except BusError as e:
                log.warning("PCI %02x.0 BAR %d left unmapped: %s", slot, bar.index, e)
                continue
            self._mapped[key] = want

    def mapping(self, slot: int, index: int) -> int | None:
        """Where BAR `index` of slot `slot` is mapped now (None: unmapped)."""
        have = self._mapped.get((slot, index))
        return None if have is None else have[1]

    # --- ports 0xCF8..0xCFF ---------------------------------------------------------------

    def _target(self) -> tuple[PciFunction | None, int]:
        a = self.address
        if not a & ENABLE or (a >> 16) & 0xFF or (a >> 8) & 0x7:
            return None, 0
        return self.functions.get((a >> 11) & 0x1F), a & 0xFC

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            return self.address if offset == 0 and size == 4 else (1 << 8 * size) - 1
        function, register = self._target()
        if function is None:
            return (1 << 8 * size) - 1
        return function.config_read(register + offset - 4, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:
                self.address = value & 0x80FFFFFC
            elif offset == RESET_CONTROL and size == 1 and value & RESET_CPU and self.on_reset:
                self.on_reset()   # PIIX reset control: firmware's way to reboot
            return   # other byte probes: ignored
        function, register = self._target()
        if function is not None:
            function.config_write(register + offset - 4, size, value)

    # --- contract ---------------------------------------------------------------------

    def reset(self) -> None:
        self.address = 0
        self.host.reset()

    def save(self) -> dict:
        return saved(self, {"address": self.address, "host": self.host.save()})

    def restore(self, state: dict) -> None:
        def load(s: dict) -> None:
            address = as_int(s["address"])
            self.host.restore(s["host"])
            self.address = address
        restore_state(self, state, load)


def attach_host_bridge(io_bus: Bus, mmio_bus: Bus) -> PciHostBridge:
    """A host bridge on `io_bus` at 0xCF8, with its ECAM window on
    `mmio_bus` at ECAM_BASE (bridge.ecam)."""
    bridge = PciHostBridge(io_bus, mmio_bus)
    io_bus.insert(CONFIG_ADDRESS_PORT, CONFIG_PORTS, bridge, "pci-config")
    bridge.ecam = PciEcam(bridge)
    mmio_bus.insert(ECAM_BASE, ECAM_SIZE, bridge.ecam, "pci-ecam")
    return bridge


__all__ = ["PciHostBridge", "attach_host_bridge", "intx_gsi", "ECAM_BASE", "ECAM_SIZE"]
