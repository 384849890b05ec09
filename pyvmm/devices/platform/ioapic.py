"""The I/O APIC (82093AA register set, version 0x11, 24 pins).

Offsets of its MMIO range (0xFEC00000 on a PC, 0x20 bytes used): 0x00 is
IOREGSEL (the index), 0x10 is IOWIN (the 32-bit window on the selected
register).  Registers: 0x00 ID (bits 27:24), 0x01 version, 0x02
arbitration ID, 0x10 + 2n / 0x11 + 2n the low / high halves of the
redirection entry of pin n.

Pins are driven with `set_irq(pin, level)`, where level 1 means asserted:
devices report logical levels, so the polarity bit is stored but does not
invert anything.  An edge-triggered pin delivers on each rising edge while
unmasked.  A level-triggered pin delivers while asserted, unmasked and its
remote IRR clear, and sets remote IRR; the local APIC's EOI of that vector
(`eoi(vector)`) clears remote IRR and re-delivers if the pin is still high.

Delivery goes to `deliver(dest, logical, mode, vector, level_trigger)`,
supplied by the interrupt controller glue, which finds the local APICs.
Nothing here raises."""

from __future__ import annotations

import logging
from typing import Callable

from ...device import as_int, as_list, restore_state, saved

log = logging.getLogger(__name__)

IOAPIC_BASE = 0xFEC00000
IOAPIC_SIZE = 0x20
IOREGSEL = 0x00
IOWIN = 0x10

REG_ID, REG_VERSION, REG_ARB = 0x00, 0x01, 0x02
REDIR_FIRST = 0x10
PINS = 24
VERSION = 0x11
VERSION_VALUE = (PINS - 1) << 16 | VERSION

RTE_MODE_SHIFT = 8
RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
RTE_RO = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR
RTE_WRITABLE_LO = 0x1FFFF & ~RTE_RO
RTE_DEST_SHIFT = 56

# deliver(dest, logical, delivery_mode, vector, level_trigger)
Deliver = Callable[[int, bool, int, int, bool], None]


class IoApic:
    """An I/O APIC with PINS redirection entries."""

    STATE_VERSION = 1

    def __init__(self, ioapic_id: int = 0, deliver: Deliver | None = None):
        self.initial_id = ioapic_id
        self.deliver = deliver
        self.delivered = 0
        self.reset()

    def reset(self) -> None:
        self.id = self.initial_id
        self.regsel = 0
        self.rte = [RTE_MASKED] * PINS
        self.levels = 0  # asserted pins

    def __repr__(self) -> str:
        return f"IoApic(id={self.id}, asserted={self.levels:#x})"

    # --- pins --------------------------------------------------------------------

    def set_irq(self, pin: int, level: int) -> None:
        bit = 1 << pin
        was = self.levels & bit
        if level:
            self.levels |= bit
        else:
            self.levels &= ~bit
            return
        rte = self.rte[pin]
        if rte & RTE_LEVEL or not was:
            self._service(pin)

    def _service(self, pin: int) -> None:
        """Delivers pin's interrupt if its state calls for it."""
        rte = self.rte[pin]
        if rte & RTE_MASKED or not self.levels & (1 << pin):
            return
        level = bool(rte & RTE_LEVEL)
        if level:
            if rte & RTE_REMOTE_IRR:
                return
            self.rte[pin] = rte | RTE_REMOTE_IRR
        self.delivered += 1
        if self.deliver is not None:
            self.deliver(rte >> RTE_DEST_SHIFT, bool(rte & RTE_DEST_LOGICAL),
                         (rte >> RTE_MODE_SHIFT) & 7, rte & 0xFF, level)

    def eoi(self, vector: int) -> None:
        """A local APIC retired level-triggered `vector`."""
        for pin, rte in enumerate(self.rte):
            if rte & RTE_REMOTE_IRR and rte & 0xFF == vector:
                self.rte[pin] = rte & ~RTE_REMOTE_IRR
                self._service(pin)

    # --- registers -------------------------------------------------------------------

    def read_reg(self, reg: int) -> int:
        if reg == REG_ID:
            return (self.id & 0xF) << 24
        if reg == REG_VERSION:
            return VERSION_VALUE
        if reg == REG_ARB:
            return (self.id & 0xF) << 24
        index = reg - REDIR_FIRST
        if 0 <= index < 2 * PINS:
            rte = self.rte[index >> 1]
            return rte >> 32 if index & 1 else rte & 0xFFFFFFFF
        return 0

    def write_reg(self, reg: int, value: int) -> None:
        value &= 0xFFFFFFFF
        if reg == REG_ID:
            self.id = (value >> 24) & 0xF
            return
        index = reg - REDIR_FIRST
        if not 0 <= index < 2 * PINS:
            return
        pin = index >> 1
        rte = self.rte[pin]
        if index & 1:
            rte = (rte & 0xFFFFFFFF) | (value & 0xFF000000) << 32
        else:
            rte = (rte & ~RTE_WRITABLE_LO) | (value & RTE_WRITABLE_LO)
            if not rte & RTE_LEVEL:
                rte &= ~RTE_REMOTE_IRR
        self.rte[pin] = rte
        if not index & 1 and rte & RTE_LEVEL:
            self._service(pin)                  # unmasked while asserted

    def read(self, offset: int, size: int) -> int:
        if offset == IOREGSEL:
            return self.regsel
        if IOWIN <= offset < IOWIN + 4:
            value = self.read_reg(self.regsel)
            return (value >> ((offset - IOWIN) * 8)) & ((1 << (8 * size)) - 1)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == IOREGSEL:
            self.regsel = value & 0xFF
        elif offset == IOWIN:
            self.write_reg(self.regsel, value)

    def save(self) -> dict:
        return saved(self, {"id": self.id, "regsel": self.regsel, "rte": list(self.rte),
                            "levels": self.levels})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        self.id = as_int(state["id"])
        self.regsel = as_int(state["regsel"])
        self.rte = [as_int(v) for v in as_list(state["rte"], PINS)]
        self.levels = as_int(state["levels"])
