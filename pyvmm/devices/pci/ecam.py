"""ECAM: PCI Express enhanced configuration access, config space as memory.

Each function gets 4 KiB at ECAM_BASE + (bus << 20 | device << 15 |
function << 12) (PCI Express Base spec 6.0, 7.2.2); the MCFG ACPI table
(boot/acpi.py) tells the guest where the window is and which buses it
covers.  Only bus 0 exists, so the window is 1 MiB.

The functions are conventional PCI: offsets 0-255 are the same bytes as
through ports 0xCF8/0xCFC, and the extended space (256-4095) reads as zero
(an empty extended capability list, which is how the guest learns there are
no extended capabilities) and ignores writes.  Addresses of absent
functions read as all-ones, as a master abort would.
"""

from __future__ import annotations

from typing import Protocol

from .function import PciFunction


class Bus0(Protocol):
    """What the window needs of its host bridge (host.py's PciHostBridge,
    which imports this module to build its window)."""
    functions: dict[int, PciFunction]

# 1 MiB for bus 0, at the bottom of the MMIO hole above the largest low RAM
# (memory.LOW_RAM_LIMIT, 3 GiB).
ECAM_BASE, ECAM_SIZE = 0xE0000000, 1 << 20
EXTENDED_SPACE = 0x1000
CONVENTIONAL_SPACE = 0x100


class PciEcam:
    """The ECAM window of `bridge`'s bus 0; placed on the MMIO bus by
    attach_host_bridge.  Knows only offsets inside the window."""

    def __init__(self, bridge: Bus0):
        self.bridge = bridge
        self.reads = 0            # accesses the guest made here (tests see ECAM in use)
        self.writes = 0

    def __repr__(self) -> str:
        return f"PciEcam(reads={self.reads}, writes={self.writes})"

    def _target(self, offset: int):
        if not 0 <= offset < ECAM_SIZE:
            return None, 0
        slot, function = (offset >> 15) & 0x1F, (offset >> 12) & 0x7
        if function:
            return None, 0
        return self.bridge.functions.get(slot), offset & (EXTENDED_SPACE - 1)

    def read(self, offset: int, size: int) -> int:
        if size == 8:       # a 64-bit access is two dword accesses, low first
            return self.read(offset, 4) | self.read(offset + 4, 4) << 32
        self.reads += 1
        function, register = self._target(offset)
        if function is None:
            return (1 << 8 * size) - 1
        if register >= CONVENTIONAL_SPACE:
            return 0
        return function.config_read(register, min(size, CONVENTIONAL_SPACE - register))

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.write(offset, 4, value & 0xFFFFFFFF)
            self.write(offset + 4, 4, value >> 32)
            return
        self.writes += 1
        function, register = self._target(offset)
        if function is not None and register < CONVENTIONAL_SPACE:
            function.config_write(register, size, value)

    # --- contract: the window holds no state of its own --------------------------

    def reset(self) -> None:
        pass

    def save(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass


__all__ = ["PciEcam"]
