"""The local APIC of one vCPU: xAPIC registers (offsets in its 4 KiB page at
0xFEE00000, Intel SDM vol. 3 ch. 11), the x2APIC MSRs 0x800-0x8FF, the
IA32_APIC_BASE and IA32_TSC_DEADLINE MSRs, and the APIC timer.

Interrupts arrive with `accept(vector, level)`; the CPU side asks
`has_interrupt()` (highest IRR vector's class above the PPR's) and takes
one with `acknowledge()` (IRR -> ISR).  A write to EOI retires the highest
in-service vector and, when it was level-triggered (TMR bit), calls
`on_eoi(vector)` so the IOAPIC can clear its remote IRR.

Interprocessor interrupts written to ICR go to `send(...)`, the
interrupt controller glue, which finds the destinations.  NMI, INIT and
SIPI are not vectors in IRR: the glue handles them (see intc.py).

The timer counts at APIC_BUS_HZ (1 GHz, the CPUID 0x15 crystal) divided
by the divide configuration; modes one-shot, periodic and TSC-deadline.
`poll(now_ns)` fires an expired timer; `next_deadline_ns()` says when.

Paravirtual EOI (KVM's MSR_KVM_PV_EOI_EN, set up by engines/bt/kvmpv.py
through `set_pv_eoi(flag)`): when `acknowledge()` takes an edge-triggered
vector and nothing else waits in IRR, it sets the guest's flag, and the
guest clears the flag instead of writing EOI.  The next time the APIC
looks at its state (has_interrupt, acknowledge, a register access,
save), a cleared flag means the EOI was done and the APIC does it;
a flag still set is cleared, so the guest writes a real EOI later.

PIC pass-through: `accepts_pic()` is true while the APIC is globally
disabled (IA32_APIC_BASE bit 11 clear) or LVT LINT0 is unmasked with
delivery mode ExtINT (virtual-wire mode).  The BSP comes out of reset with
LINT0 programmed as ExtINT, as firmware leaves it, so a guest that has
not touched its APIC gets the 8259's interrupts.

MSR accessors return None / False where a real CPU raises #GP; nothing
else raises."""

from __future__ import annotations

import logging
from typing import Callable

from ...device import as_dict, as_int, restore_state, saved
from .clock import APIC_BUS_HZ, NEVER, GuestClock, ns_for_ticks, ticks_at

log = logging.getLogger(__name__)

LAPIC_BASE = 0xFEE00000
LAPIC_SIZE = 0x1000

# Register offsets.
ID, VERSION, TPR, APR, PPR, EOI, RRD, LDR, DFR, SVR = (
    0x020, 0x030, 0x080, 0x090, 0x0A0, 0x0B0, 0x0C0, 0x0D0, 0x0E0, 0x0F0)
ISR0, TMR0, IRR0, ESR = 0x100, 0x180, 0x200, 0x280
LVT_CMCI, ICR_LO, ICR_HI = 0x2F0, 0x300, 0x310
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = (
    0x320, 0x330, 0x340, 0x350, 0x360, 0x370)
TIMER_ICR, TIMER_CCR, TIMER_DCR, SELF_IPI = 0x380, 0x390, 0x3E0, 0x3F0
LVTS = (LVT_CMCI, LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR)

APIC_VERSION = 0x14
MAX_LVT = 6                      # 7 LVT entries (with CMCI)
VERSION_VALUE = MAX_LVT << 16 | APIC_VERSION

SVR_ENABLE = 0x100
LVT_MASKED = 1 << 16
LVT_LEVEL = 1 << 15
LVT_TIMER_MODE_SHIFT = 17
TIMER_ONESHOT, TIMER_PERIODIC, TIMER_TSC_DEADLINE = 0, 1, 2
ESR_ILLEGAL_VECTOR_RX = 0x40
ESR_ILLEGAL_VECTOR_TX = 0x20

# Delivery modes (ICR, LVT and IOAPIC redirection entries share them).
DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_SIPI, DM_EXTINT = 0, 1, 2, 4, 5, 6, 7
ICR_LEVEL_ASSERT = 1 << 14
ICR_TRIGGER_LEVEL = 1 << 15
ICR_DEST_LOGICAL = 1 << 11
SH_NONE, SH_SELF, SH_ALL, SH_OTHERS = 0, 1, 2, 3

MSR_APIC_BASE = 0x1B
MSR_TSC_DEADLINE = 0x6E0
MSR_X2APIC_FIRST, MSR_X2APIC_LAST = 0x800, 0x8FF
APIC_BASE_BSP = 1 << 8
APIC_BASE_X2APIC = 1 << 10
APIC_BASE_ENABLE = 1 << 11

# Dividers indexed by DCR bits (3, 1, 0) packed as a 3-bit value.
_DIVIDERS = (2, 4, 8, 16, 32, 64, 128, 1)

# send(src, dest, logical, shorthand, mode, vector, level_trigger, assert)
Sender = Callable[["LocalApic", int, bool, int, int, int, bool, bool], None]


def _divider(dcr: int) -> int:
    return _DIVIDERS[(dcr & 3) | ((dcr >> 1) & 4)]


class LocalApic:
    """One vCPU's local APIC."""

    STATE_VERSION = 1

    def __init__(self, apic_id: int, clock: GuestClock, send: Sender | None = None,
                 on_eoi: Callable[[int], None] | None = None, bsp: bool = False):
        self.apic_id = apic_id
        self.clock = clock
        self.send = send
        self.on_eoi = on_eoi
        self.bsp = bsp
        self.on_timer_change = lambda: None
        self.on_interrupt = lambda: None          # new IRR bit (wake the vCPU)
        self.timer_fired = 0
        self.pv_eois = 0          # EOIs done through the guest's PV-EOI flag
        self.reset()

    def reset(self) -> None:
        """Power-on state (also INIT, but for the ID and APIC base)."""
        self.apic_base = LAPIC_BASE | APIC_BASE_ENABLE | (APIC_BASE_BSP if self.bsp else 0)
        self.init_reset()

    def init_reset(self) -> None:
        """The state an INIT IPI leaves: all but the ID and APIC base."""
        self.irr = self.isr = self.tmr = 0       # 256-bit masks
        self.pv_eoi = None        # the guest's PV-EOI flag (kvmpv.PvEoiFlag), off after INIT
        self.pv_eoi_vector = -1   # the vector whose EOI the flag stands for
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFFFFFF
        self.svr = 0xFF
        self.esr = 0
        self.esr_pending = 0
        self.icr = 0
        self.lvt = {r: LVT_MASKED for r in LVTS}
        if self.bsp:
            self.lvt[LVT_LINT0] = DM_EXTINT << 8  # virtual wire, as firmware leaves it
        self.timer_initial = 0
        self.timer_start = 0
        self.dcr = 0
        self.tsc_deadline = 0
        self.timer_expiry = NEVER
        self.on_timer_change()

    def __repr__(self) -> str:
        return (f"LocalApic(id={self.apic_id}, irr={self.irr:#x}, isr={self.isr:#x}, "
                f"tpr={self.tpr:#x}, enabled={self.sw_enabled})")

    # --- state queries -----------------------------------------------------------

    @property
    def hw_enabled(self) -> bool:
        return bool(self.apic_base & APIC_BASE_ENABLE)

    @property
    def sw_enabled(self) -> bool:
        return self.hw_enabled and bool(self.svr & SVR_ENABLE)

    @property
    def x2apic(self) -> bool:
        return bool(self.apic_base & APIC_BASE_X2APIC)

    def ppr(self) -> int:
        isrv = self.isr.bit_length() - 1 if self.isr else 0
        if (self.tpr & 0xF0) >= (isrv & 0xF0):
            return self.tpr & 0xFF
        return isrv & 0xF0

    def has_interrupt(self) -> bool:
        """A fixed interrupt is ready: highest IRR class above the PPR's."""
        if self.pv_eoi_vector >= 0:
            self.pv_eoi_sync()
        if not self.irr or not self.hw_enabled:
            return False
        return ((self.irr.bit_length() - 1) & 0xF0) > (self.ppr() & 0xF0)

    def acknowledge(self) -> int:
        """Moves the highest IRR vector to ISR and returns it (-1 if none)."""
        if self.pv_eoi_vector >= 0:
            self.pv_eoi_sync()
        if not self.irr:
            return -1
        vector = self.irr.bit_length() - 1
        self.irr &= ~(1 << vector)
        self.isr |= 1 << vector
        if self.pv_eoi is not None and not self.irr and not self.tmr >> vector & 1:
            self.pv_eoi.set()
            self.pv_eoi_vector = vector
        return vector

    # --- paravirtual EOI ------------------------------------------------------------------

    def set_pv_eoi(self, flag) -> None:
        """Uses the guest's PV-EOI flag (an object with set() and
        test_and_clear()), or stops using one (None)."""
        self.pv_eoi_sync()
        self.pv_eoi = flag

    def pv_eoi_sync(self) -> None:
        """Settles an injection made with the PV-EOI flag set: EOI if the
        guest cleared the flag, else clear it (a real EOI will come)."""
        vector, self.pv_eoi_vector = self.pv_eoi_vector, -1
        if vector < 0 or self.pv_eoi is None:
            return
        if not self.pv_eoi.test_and_clear():
            self.pv_eois += 1
            self._eoi()

    def accepts_pic(self) -> bool:
        """Whether the 8259's INTR reaches this CPU (see the module doc)."""
        if not self.hw_enabled:
            return True
        lint0 = self.lvt[LVT_LINT0]
        return not lint0 & LVT_MASKED and (lint0 >> 8) & 7 == DM_EXTINT

    # --- delivery in -----------------------------------------------------------------

    def accept(self, vector: int, level: bool = False) -> None:
        """A fixed interrupt arrives (from the IOAPIC, an IPI or an LVT)."""
        if vector < 16:
            self._error(ESR_ILLEGAL_VECTOR_RX)
            return
        if not self.sw_enabled:
            return                                       # a disabled APIC drops fixed interrupts
        bit = 1 << vector
        self.irr |= bit
        if level:
            self.tmr |= bit
        else:
            self.tmr &= ~bit
        self.on_interrupt()

    def write_may_deliver(self, offset: int) -> bool:
        """Whether a write at `offset` (MMIO page) may make an interrupt
        deliverable at once: an IPI (possibly to itself), or a TPR or EOI
        write while a vector waits in the IRR.  Engines that run code in
        blocks end the block there only when it may (see bt's mmu)."""
        reg = offset & 0xFF0
        if reg == ICR_LO:
            return True
        return reg in (TPR, EOI) and bool(self.irr)

    def _uncovered(self) -> None:
        """A lower TPR or an EOI may let a waiting vector through: the CPU
        takes it at its next instruction boundary, so tell the engine."""
        if self.irr and self.has_interrupt():
            self.on_interrupt()

    def _error(self, bits: int) -> None:
        self.esr_pending |= bits
        lvt = self.lvt[LVT_ERROR]
        if not lvt & LVT_MASKED and (lvt & 0xFF) >= 16:
            self.accept(lvt & 0xFF)

    def _eoi(self) -> None:
        if not self.isr:
            return
        vector = self.isr.bit_length() - 1
        bit = 1 << vector
        self.isr &= ~bit
        if self.tmr & bit and self.on_eoi is not None:
            self.on_eoi(vector)

    # --- timer ---------------------------------------------------------------------------

    def _timer_mode(self) -> int:
        return (self.lvt[LVT_TIMER] >> LVT_TIMER_MODE_SHIFT) & 3

    def _tick_ns(self) -> int:
        return ns_for_ticks(_divider(self.dcr), APIC_BUS_HZ)

    def _arm(self, expiry: int) -> None:
        self.timer_expiry = expiry
        self.on_timer_change()

    def _current_count(self, now: int) -> int:
        if not self.timer_initial or self._timer_mode() == TIMER_TSC_DEADLINE:
            return 0
        ticks = ticks_at(now - self.timer_start, APIC_BUS_HZ) // _divider(self.dcr)
        if self._timer_mode() == TIMER_PERIODIC:
            return self.timer_initial - ticks % self.timer_initial
        return max(0, self.timer_initial - ticks)

    def next_deadline_ns(self) -> int:
        return self.timer_expiry

    def poll(self, now: int) -> bool:
        """Fires the timer if it has expired; True if it did."""
        if now < self.timer_expiry:
            return False
        self.timer_fired += 1
        lvt = self.lvt[LVT_TIMER]
        mode = self._timer_mode()
        if mode == TIMER_PERIODIC and self.timer_initial:
            period = self.timer_initial * self._tick_ns()
            missed = (now - self.timer_expiry) // period
            self._arm(self.timer_expiry + (missed + 1) * period)
        else:
            self.tsc_deadline = 0
            self._arm(NEVER)
        if not lvt & LVT_MASKED:
            self.accept(lvt & 0xFF)
        return True

    def _start_count(self, value: int) -> None:
        self.timer_initial = value & 0xFFFFFFFF
        if self._timer_mode() == TIMER_TSC_DEADLINE:
            return                                 # ignored in TSC-deadline mode
        self.timer_start = self.clock.now_ns()
        if self.timer_initial:
            self._arm(self.timer_start + self.timer_initial * self._tick_ns())
        else:
            self._arm(NEVER)

    def _write_lvt_timer(self, value: int) -> None:
        old_mode = self._timer_mode()
        self.lvt[LVT_TIMER] = value
        if self._timer_mode() != old_mode:          # switching modes disarms the timer
            self.timer_initial = 0
            self.tsc_deadline = 0
            self._arm(NEVER)

    def _write_dcr(self, value: int) -> None:
        now = self.clock.now_ns()
        ticks = ticks_at(now - self.timer_start, APIC_BUS_HZ) // _divider(self.dcr)
        self.dcr = value & 0xB
        if self.timer_initial and self._timer_mode() != TIMER_TSC_DEADLINE:
            self.timer_start = now - ticks * self._tick_ns()
            done = ticks % self.timer_initial if self._timer_mode() == TIMER_PERIODIC else ticks
            self._arm(now + max(0, self.timer_initial - done) * self._tick_ns())

    def write_tsc_deadline(self, value: int) -> None:
        if self._timer_mode() != TIMER_TSC_DEADLINE:
            return
        self.tsc_deadline = value
        self._arm(self.clock.tsc_to_ns(value) if value else NEVER)

    # --- registers ---------------------------------------------------------------------------

    def read_reg(self, reg: int) -> int:
        """The 32-bit register at xAPIC offset `reg` (16-byte aligned)."""
        if self.pv_eoi_vector >= 0:
            self.pv_eoi_sync()
        if reg == ID:
            return self.apic_id if self.x2apic else self.apic_id << 24
        if reg == VERSION:
            return VERSION_VALUE
        if reg == TPR:
            return self.tpr
        if reg == PPR:
            return self.ppr()
        if reg == LDR:
            if self.x2apic:
                return (self.apic_id >> 4) << 16 | 1 << (self.apic_id & 0xF)
            return self.ldr
        if reg == DFR:
            return self.dfr
        if reg == SVR:
            return self.svr
        if ISR0 <= reg < ISR0 + 0x80:
            return (self.isr >> ((reg - ISR0) >> 4 << 5)) & 0xFFFFFFFF
        if TMR0 <= reg < TMR0 + 0x80:
            return (self.tmr >> ((reg - TMR0) >> 4 << 5)) & 0xFFFFFFFF
        if IRR0 <= reg < IRR0 + 0x80:
            return (self.irr >> ((reg - IRR0) >> 4 << 5)) & 0xFFFFFFFF
        if reg == ESR:
            return self.esr
        if reg == ICR_LO:
            return self.icr & 0xFFFFFFFF & ~(1 << 12)  # delivery status: always idle
        if reg == ICR_HI:
            return self.icr >> 32
        if reg in self.lvt:
            return self.lvt[reg]
        if reg == TIMER_ICR:
            return self.timer_initial
        if reg == TIMER_CCR:
            return self._current_count(self.clock.now_ns())
        if reg == TIMER_DCR:
            return self.dcr
        return 0

    def write_reg(self, reg: int, value: int) -> None:
        if self.pv_eoi_vector >= 0:
            self.pv_eoi_sync()
        value &= 0xFFFFFFFF
        if reg == ID:
            if not self.x2apic:
                self.apic_id = value >> 24
        elif reg == TPR:
            self.tpr = value & 0xFF
            self._uncovered()
        elif reg == EOI:
            self._eoi()
            self._uncovered()
        elif reg == LDR:
            self.ldr = value & 0xFF000000
        elif reg == DFR:
            self.dfr = value | 0x0FFFFFFF
        elif reg == SVR:
            self.svr = value & 0x13FF
            if not value & SVR_ENABLE:                  # software disable masks every LVT
                for r in self.lvt:
                    self.lvt[r] |= LVT_MASKED
        elif reg == ESR:
            self.esr, self.esr_pending = self.esr_pending, 0
        elif reg == ICR_LO:
            self.icr = (self.icr & ~0xFFFFFFFF) | value
            self._send_ipi()
        elif reg == ICR_HI:
            self.icr = (self.icr & 0xFFFFFFFF) | (value & 0xFF000000) << 32
        elif reg in self.lvt:
            if not self.svr & SVR_ENABLE:
                value |= LVT_MASKED
            if reg == LVT_TIMER:
                self._write_lvt_timer(value & 0x700FF)
            else:
                self.lvt[reg] = value & 0x1A7FF
        elif reg == TIMER_ICR:
            self._start_count(value)
        elif reg == TIMER_DCR:
            self._write_dcr(value)
        elif reg == SELF_IPI:
            self.accept(value & 0xFF)

    def _send_ipi(self) -> None:
        icr = self.icr
        vector = icr & 0xFF
        mode = (icr >> 8) & 7
        if self.x2apic:
            dest = icr >> 32
        else:
            dest = (icr >> 56) & 0xFF
        if mode == DM_FIXED and vector < 16:
            self._error(ESR_ILLEGAL_VECTOR_TX)
            return
        if self.send is not None:
            self.send(self, dest, bool(icr & ICR_DEST_LOGICAL), (icr >> 18) & 3, mode, vector,
                      bool(icr & ICR_TRIGGER_LEVEL), bool(icr & ICR_LEVEL_ASSERT))

    def matches(self, dest: int, logical: bool) -> bool:
        """Whether this APIC is a destination of `dest` (xAPIC 8-bit or x2APIC 32-bit)."""
        if self.x2apic:
            if not logical:
                return dest == 0xFFFFFFFF or dest == self.apic_id
            ldr = self.read_reg(LDR)
            return (dest >> 16) == (ldr >> 16) and bool(dest & ldr & 0xFFFF)
        if not logical:
            return dest == 0xFF or dest == self.apic_id
        if dest == 0xFF:
            return True
        ldr = self.ldr >> 24
        if self.dfr >> 28 == 0xF:                        # flat model
            return bool(dest & ldr)
        return (dest >> 4) == (ldr >> 4) and bool(dest & ldr & 0xF)  # cluster model

    # --- bus side (xAPIC MMIO page) -------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if self.x2apic or not self.hw_enabled:
            return 0xFFFFFFFF if size == 4 else (1 << (8 * size)) - 1
        value = self.read_reg(offset & 0xFF0)
        return (value >> ((offset & 3) * 8)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if self.x2apic or not self.hw_enabled:
            return
        if offset & 0xF:
            log.debug("lapic %d: unaligned write at %#x ignored", self.apic_id, offset)
            return
        self.write_reg(offset & 0xFF0, value)

    # --- MSRs --------------------------------------------------------------------------------

    def read_msr(self, index: int) -> int | None:
        """IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register; None
        where the CPU would raise #GP."""
        if index == MSR_APIC_BASE:
            return self.apic_base
        if index == MSR_TSC_DEADLINE:
            return self.tsc_deadline if self._timer_mode() == TIMER_TSC_DEADLINE else 0
        if MSR_X2APIC_FIRST <= index <= MSR_X2APIC_LAST and self.x2apic:
            reg = (index - MSR_X2APIC_FIRST) << 4
            if reg in (EOI, DFR, ICR_HI, SELF_IPI):
                return None                              # write-only or absent
            if reg == ICR_LO:
                return self.icr
            return self.read_reg(reg)
        return None

    def write_msr(self, index: int, value: int) -> bool:
        """Writes an APIC MSR; False where the CPU would raise #GP."""
        if index == MSR_APIC_BASE:
            if (value & 0xFFFFF000) != LAPIC_BASE:
                log.warning("lapic %d: relocating the APIC to %#x is not supported", self.apic_id, value)
            was_enabled = self.hw_enabled
            self.apic_base = LAPIC_BASE | (value & (APIC_BASE_ENABLE | APIC_BASE_X2APIC)) | (
                APIC_BASE_BSP if self.bsp else 0)
            if was_enabled and not self.hw_enabled:
                self.init_reset()
            return True
        if index == MSR_TSC_DEADLINE:
            self.write_tsc_deadline(value)
            return True
        if MSR_X2APIC_FIRST <= index <= MSR_X2APIC_LAST and self.x2apic:
            reg = (index - MSR_X2APIC_FIRST) << 4
            if reg in (ID, VERSION, PPR, LDR, DFR, ICR_HI, TIMER_CCR) or ISR0 <= reg < IRR0 + 0x80:
                return False                             # read-only or absent in x2APIC mode
            if reg == ICR_LO:
                self.icr = value & 0xFFFFFFFF000FFFFF
                self._send_ipi()
                return True
            self.write_reg(reg, value)
            return True
        return False

    # --- snapshots ------------------------------------------------------------------------------

    def save(self) -> dict:
        self.pv_eoi_sync()                     # no EOI left pending on the guest's flag
        return saved(self, {"apic_id": self.apic_id, "apic_base": self.apic_base, "irr": self.irr,
                "isr": self.isr, "tmr": self.tmr, "tpr": self.tpr, "ldr": self.ldr,
                "dfr": self.dfr, "svr": self.svr, "esr": self.esr, "esr_pending": self.esr_pending,
                "icr": self.icr, "lvt": {str(k): v for k, v in self.lvt.items()},
                "timer_initial": self.timer_initial, "timer_start": self.timer_start,
                "dcr": self.dcr, "tsc_deadline": self.tsc_deadline, "timer_expiry": self.timer_expiry})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        lvt = {int(k): as_int(v) for k, v in as_dict(state["lvt"]).items()}
        if set(lvt) != set(LVTS):
            raise ValueError("lvt registers do not match")
        for key in ("apic_id", "apic_base", "irr", "isr", "tmr", "tpr", "ldr", "dfr", "svr",
                    "esr", "esr_pending", "icr", "timer_initial", "timer_start", "dcr",
                    "tsc_deadline", "timer_expiry"):
            setattr(self, key, as_int(state[key]))
        self.lvt = lvt
        self.on_timer_change()
