"""ACPI PCI hotplug of bus 0's slots: the register block the DSDT's slot
methods (boot/acpi_hotplug.py) read and write, in the layout QEMU documents
for its PIIX4 machines (docs/specs/acpi_pci_hotplug.rst), so a guest's
ACPI hotplug driver (Linux: acpiphp) finds devices as they come and go.

Offsets inside the device's 16-byte range (the builder puts it at
HOTPLUG_BASE, 0xae00), each a 32-bit bitmap with bit N for slot N:

    0x0  PCI_UP     read: slots given a device since the last read (the read clears them)
    0x4  PCI_DOWN   read: slots whose device the host asked the guest to give back
    0x8  PCI_EJ     write: the slots the guest has let go of; reads 0
    0xC  PCI_RMV    read: slots whose device can be removed (those plugged at run time)

The handshake: plug(slot) sets the slot's UP bit and raises GPE 1; the
guest's _E01 method reads UP and DOWN and Notifies each slot, "device
check" (1) for UP, "eject request" (3) for DOWN; for an eject request the
guest stops using the device and calls the slot's _EJ0, which writes the
slot's bit to PCI_EJ.  Only then is the device taken off (`on_eject(slot)`,
set by whoever owns hotplugged devices: api/hotplug.py) and the slot's
DOWN bit cleared: a guest that never ejects keeps the device, as on QEMU.

A removal the guest has not completed is saved with the rest (DOWN), so
after a snapshot restore or a migration the guest's eject still removes
the device: the handler is one per machine, not one per request, so
nothing of it needs saving.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from ..device import as_int, restore_state, saved

log = logging.getLogger(__name__)

HOTPLUG_BASE = 0xAE00
HOTPLUG_LENGTH = 16
PCI_UP, PCI_DOWN, PCI_EJ, PCI_RMV = 0x0, 0x4, 0x8, 0xC
_REGS = struct.Struct("<IIII")
HOTPLUG_GPE = 1            # the DSDT's \_GPE._E01
SLOTS = 32
SLOT_MASK = (1 << SLOTS) - 1 & ~1     # slot 0 is the host bridge: never hotplugged


class PciHotplug:
    """The register block.  `raise_gpe()` raises the hotplug GPE (the PM
    device's GPE0 block drives the SCI)."""

    STATE_VERSION = 2      # 2: pending removals (DOWN)
    STATE_UPGRADES = {1: lambda fields: {**fields, "down": 0}}   # version 1 did not save them

    def __init__(self, raise_gpe: Callable[[], None] | None = None,
                 on_eject: Callable[[int], None] | None = None):
        self.raise_gpe = raise_gpe
        self.on_eject = on_eject
        self.reset()

    def __repr__(self) -> str:
        return f"PciHotplug(up=0x{self.up:08x}, down=0x{self.down:08x}, removable=0x{self.removable:08x})"

    def reset(self) -> None:
        self.up = 0
        self.down = 0
        self.removable = 0

    # -- the host's side ---------------------------------------------------------------
    def plug(self, slot: int) -> None:
        """A device went into `slot`: tell the guest to look."""
        bit = self._bit(slot)
        self.up |= bit
        self.down &= ~bit
        self.removable |= bit
        self._signal()

    def request_unplug(self, slot: int) -> None:
        """Asks the guest to give back `slot`'s device; `on_eject(slot)` is
        called when it has (it writes the slot's bit to PCI_EJ)."""
        bit = self._bit(slot)
        self.down |= bit
        self.up &= ~bit
        self._signal()

    def pending_unplug(self, slot: int) -> bool:
        return bool(self.down & self._bit(slot))

    def _signal(self) -> None:
        if self.raise_gpe is not None:
            self.raise_gpe()

    @staticmethod
    def _bit(slot: int) -> int:
        if not 1 <= slot < SLOTS:
            raise ValueError(f"PCI slot {slot} cannot be hotplugged (1..{SLOTS - 1})")
        return 1 << slot

    # -- the guest's side --------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        data = _REGS.pack(self.up, self.down, 0, self.removable)[offset:offset + size]
        if offset <= PCI_UP < offset + len(data):
            self.up = 0          # announced: the next event reports only newer plugs
        return int.from_bytes(data.ljust(size, b"\xff"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != PCI_EJ or size != 4:
            log.debug("ignored hotplug register write at +0x%x (%d bytes)", offset, size)
            return
        for slot in range(1, SLOTS):
            if not value & 1 << slot:
                continue
            if not self.down & 1 << slot:
                log.debug("guest ejected slot %d, which the host did not ask for: kept", slot)
                continue
            self.down &= ~(1 << slot)
            self.removable &= ~(1 << slot)
            if self.on_eject is None:
                log.warning("guest ejected slot %d, but nothing on this host can remove its device", slot)
                continue
            self.on_eject(slot)

    # -- snapshots ---------------------------------------------------------------------
    def save(self) -> dict:
        return saved(self, {"up": self.up, "down": self.down, "removable": self.removable})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        self.up = as_int(state["up"]) & SLOT_MASK
        self.down = as_int(state["down"]) & SLOT_MASK
        self.removable = as_int(state["removable"]) & SLOT_MASK


__all__ = [
    "HOTPLUG_BASE",
    "HOTPLUG_GPE",
    "HOTPLUG_LENGTH",
    "PCI_DOWN",
    "PCI_EJ",
    "PCI_RMV",
    "PCI_UP",
    "PciHotplug",
]
