"""The PC's two cascaded 8259A programmable interrupt controllers and the
edge/level control registers (ELCR).

`Pic8259` is one chip; its bus range is two ports (offset 0: ICW1, OCW2,
OCW3 / IRR, ISR, poll; offset 1: ICW2-4, OCW1 / IMR).  `PicPair` holds the
master (ports 0x20/0x21, IRQ 0-7), the slave (0xA0/0xA1, IRQ 8-15, its
output wired to the master's IR2) and the ELCR device (0x4D0/0x4D1, one bit
per IRQ, 1 = level-triggered).  A PC board places them; see `ranges()`.

Lines are given as levels with `set_irq(irq, level)`.  An edge-triggered
input latches its IRR bit on a rising edge and keeps it until acknowledged;
a level-triggered one has its IRR bit follow the line.  The master's IR2
always follows the slave's output as a level, so a second slave request is
not lost when the first is acknowledged.

CPU side: `interrupt_pending()` is the master's INTR output, and
`acknowledge()` runs the INTA cycle and returns the vector (IRQ 7 / IRQ 15
of the chip concerned when the request vanished: a spurious interrupt).

Special fully nested mode (ICW4 bit 4) and the single/8085 modes are
accepted but not modelled.  Nothing here raises."""

from __future__ import annotations

import logging

from ...device import as_bool, as_int, restore_state, saved

log = logging.getLogger(__name__)

CMD = 0   # offset of the command/status port (0x20, 0xA0)
DATA = 1  # offset of the data/mask port (0x21, 0xA1)

ICW1_INIT = 0x10
ICW1_IC4 = 0x01      # ICW4 follows
ICW1_SNGL = 0x02     # single chip: no ICW3
OCW3_SELECT = 0x08   # with bit 4 clear: this is OCW3 (else OCW2)
OCW3_POLL = 0x04
OCW3_RR = 0x02       # read register command
OCW3_RIS = 0x01      # ... the ISR (else the IRR)
OCW3_ESMM = 0x40     # enable special mask mode change
OCW3_SMM = 0x20      # ... to this value
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10

CASCADE_IRQ = 2
SPURIOUS_IRQ = 7
# IRQs that can never be level-triggered on a PC (timer, keyboard, cascade,
# RTC, FPU error): the ELCR bits for them are read-only zero.
ELCR_MASKS = (0xF8, 0xDE)

_STATE_FIELDS = ("irr", "isr", "imr", "lines", "elcr", "base", "lowest", "init_step",
                 "need_icw4", "single", "icw3", "auto_eoi", "rotate_aeoi", "read_isr",
                 "poll", "special_mask", "sfnm")


class Pic8259:
    """One 8259A. `on_change` is called whenever its output may have changed."""

    STATE_VERSION = 1

    def __init__(self, name: str, elcr_mask: int):
        self.name = name
        self.elcr_mask = elcr_mask
        self.elcr = 0
        self.on_change = lambda: None
        self.reset()

    def reset(self) -> None:
        self.irr = 0          # requests
        self.isr = 0          # in service
        self.imr = 0xFF       # masked (firmware leaves them masked)
        self.lines = 0        # current input levels, for edge detection
        self.base = 0         # vector of IR0 (ICW2)
        self.lowest = 7       # IR with the lowest priority (rotation)
        self.init_step = 0    # 0: ready; 2..4: expecting ICW2..4
        self.need_icw4 = False
        self.single = False
        self.icw3 = 0
        self.auto_eoi = False
        self.rotate_aeoi = False
        self.read_isr = False
        self.poll = False
        self.special_mask = False
        self.sfnm = False

    def __repr__(self) -> str:
        return (f"Pic8259({self.name}, irr=0x{self.irr:02x}, isr=0x{self.isr:02x}, "
                f"imr=0x{self.imr:02x}, base=0x{self.base:02x})")

    # --- priority ------------------------------------------------------------

    def _highest(self, mask: int) -> int | None:
        """The IR of highest priority set in `mask`, or None."""
        if not mask:
            return None
        for i in range(8):
            irq = (self.lowest + 1 + i) & 7
            if mask & (1 << irq):
                return irq
        return None  # pragma: no cover

    def _rank(self, irq: int | None) -> int:
        return 8 if irq is None else (irq - self.lowest - 1) & 7

    def pending(self) -> int | None:
        """The IR this chip would present on INTA now, or None (INT low)."""
        req = self._highest(self.irr & ~self.imr)
        if req is None:
            return None
        in_service = self.isr & ~self.imr if self.special_mask else self.isr
        if self._rank(req) < self._rank(self._highest(in_service)):
            return req
        return None

    # --- inputs ----------------------------------------------------------------

    def set_irq(self, irq: int, level: int) -> None:
        bit = 1 << irq
        if self.elcr & bit:
            if level:
                self.irr |= bit
            else:
                self.irr &= ~bit
        elif level and not self.lines & bit:
            self.irr |= bit
        if level:
            self.lines |= bit
        else:
            self.lines &= ~bit
        self.on_change()

    def ack(self, irq: int) -> None:
        """INTA for `irq`: IRR -> ISR (unless auto-EOI)."""
        bit = 1 << irq
        if self.auto_eoi:
            if self.rotate_aeoi:
                self.lowest = irq
        else:
            self.isr |= bit
        if self.elcr & bit and self.lines & bit:
            pass  # level input still asserted: the request stays
        else:
            self.irr &= ~bit

    def _eoi(self, irq: int | None, rotate: bool) -> None:
        if irq is None:
            return
        self.isr &= ~(1 << irq)
        if rotate:
            self.lowest = irq

    # --- bus side ----------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset & 1 == DATA:
            return self.imr
        if self.poll:
            self.poll = False
            irq = self.pending()
            if irq is None:
                return 0
            self.ack(irq)
            self.on_change()
            return 0x80 | irq
        return self.isr if self.read_isr else self.irr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset & 1 == CMD:
            if value & ICW1_INIT:
                self._icw1(value)
            elif value & OCW3_SELECT:
                self._ocw3(value)
            else:
                self._ocw2(value)
        elif self.init_step == 2:
            self.base = value & 0xF8
            self.init_step = 4 if self.single else 3
            if self.single and not self.need_icw4:
                self.init_step = 0
        elif self.init_step == 3:
            self.icw3 = value
            self.init_step = 4 if self.need_icw4 else 0
        elif self.init_step == 4:
            self.auto_eoi = bool(value & ICW4_AEOI)
            self.sfnm = bool(value & ICW4_SFNM)
            self.init_step = 0
        else:
            self.imr = value  # OCW1
        self.on_change()

    def _icw1(self, value: int) -> None:
        # Initialisation clears the mask, the requests latched on edges, the
        # in-service bits, special mask mode and priority rotation.
        self.imr = 0
        self.isr = 0
        self.irr &= self.elcr & self.lines
        self.lowest = 7
        self.special_mask = False
        self.read_isr = False
        self.poll = False
        self.auto_eoi = False
        self.rotate_aeoi = False
        self.need_icw4 = bool(value & ICW1_IC4)
        self.single = bool(value & ICW1_SNGL)
        self.init_step = 2

    def _ocw2(self, value: int) -> None:
        op = value >> 5
        level = value & 7
        if op == 0b001:                       # non-specific EOI
            self._eoi(self._highest(self.isr), rotate=False)
        elif op == 0b011:                     # specific EOI
            self._eoi(level, rotate=False)
        elif op == 0b101:                     # rotate on non-specific EOI
            self._eoi(self._highest(self.isr), rotate=True)
        elif op == 0b111:                     # rotate on specific EOI
            self._eoi(level, rotate=True)
        elif op == 0b110:                     # set priority
            self.lowest = level
        elif op == 0b100:
            self.rotate_aeoi = True
        elif op == 0b000:
            self.rotate_aeoi = False

    def _ocw3(self, value: int) -> None:
        if value & OCW3_POLL:
            self.poll = True
        if value & OCW3_RR:
            self.read_isr = bool(value & OCW3_RIS)
        if value & OCW3_ESMM:
            self.special_mask = bool(value & OCW3_SMM)

    def save(self) -> dict:
        return saved(self, {f: getattr(self, f) for f in _STATE_FIELDS})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        for f in _STATE_FIELDS:
            read = as_bool if type(getattr(self, f)) is bool else as_int
            setattr(self, f, read(state[f]))


class Elcr:
    """The two ELCR bytes (offset 0: IRQ 0-7, offset 1: IRQ 8-15)."""

    def __init__(self, pair: "PicPair"):
        self.pair = pair

    def read(self, offset: int, size: int) -> int:
        return self.pair.chips[offset & 1].elcr

    def write(self, offset: int, size: int, value: int) -> None:
        chip = self.pair.chips[offset & 1]
        chip.elcr = value & chip.elcr_mask
        chip.irr = (chip.irr & ~chip.elcr) | (chip.lines & chip.elcr)
        chip.on_change()


class PicPair:
    """Master and slave 8259A with the slave cascaded on IR2, plus the ELCR.

    `on_intr(level)` (optional) is called when the master's INTR output
    changes, so the owner can wake a halted vCPU.  `intr_out` is that
    output, read directly by hot paths (bt's STI/POPF check) that cannot
    afford a call."""

    STATE_VERSION = 1

    def __init__(self, on_intr=None):
        self.master = Pic8259("master", ELCR_MASKS[0])
        self.slave = Pic8259("slave", ELCR_MASKS[1])
        self.chips = (self.master, self.slave)
        self.elcr = Elcr(self)
        self.on_intr = on_intr
        self.intr_out = False
        self.master.on_change = self._update
        self.slave.on_change = self._update

    def __repr__(self) -> str:
        return f"PicPair({self.master!r}, {self.slave!r})"

    def ranges(self) -> list[tuple[int, int, object, str]]:
        """(port, length, device, name) for a PC's I/O bus."""
        return [(0x20, 2, self.master, "pic-master"), (0xA0, 2, self.slave, "pic-slave"),
                (0x4D0, 2, self.elcr, "elcr")]

    def reset(self) -> None:
        for chip in self.chips:
            chip.reset()
            chip.elcr = 0
        self._update()

    def _update(self) -> None:
        m = self.master
        bit = 1 << CASCADE_IRQ
        if self.slave.pending() is not None:
            m.irr |= bit
            m.lines |= bit
        else:
            m.irr &= ~bit
            m.lines &= ~bit
        intr = m.pending() is not None
        if intr != self.intr_out:
            self.intr_out = intr
            if self.on_intr is not None:
                self.on_intr(intr)

    def set_irq(self, irq: int, level: int) -> None:
        """Drives ISA IRQ `irq` (0..15; 2 is the cascade and ignored)."""
        if irq == CASCADE_IRQ:
            return
        chip = self.slave if irq >= 8 else self.master
        chip.set_irq(irq & 7, 1 if level else 0)

    def interrupt_pending(self) -> bool:
        return self.intr_out

    def acknowledge(self) -> int:
        """The INTA cycle: the vector of the highest-priority request, moved
        to in-service; a spurious IRQ 7 (or 15) vector if none is left."""
        m, s = self.master, self.slave
        irq = m.pending()
        if irq is None:
            vector = m.base | SPURIOUS_IRQ
        elif irq == CASCADE_IRQ:
            m.ack(irq)
            sirq = s.pending()
            if sirq is None:
                vector = s.base | SPURIOUS_IRQ
            else:
                s.ack(sirq)
                vector = s.base | sirq
        else:
            m.ack(irq)
            vector = m.base | irq
        self._update()
        return vector

    def save(self) -> dict:
        return saved(self, {"master": self.master.save(), "slave": self.slave.save()})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        self.master.restore(state["master"])
        self.slave.restore(state["slave"])
        self.intr_out = False
        self._update()
