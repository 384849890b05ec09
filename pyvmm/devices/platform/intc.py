"""The PC interrupt platform for the `bt` engine: the 8259 pair, the 8254 PIT
(with port 0x61), the IOAPIC and one local APIC per vCPU, wired as on a PC
and as the MADT of boot/acpi.py describes it.

Device side: `set_irq(irq, level)` is the Engine.set_irq sink.  Numbers
0-15 are ISA IRQs and go to both the PIC and the IOAPIC (ISA IRQ 0, the
PIT, to IOAPIC pin 2 per the MADT's interrupt source override; ISA IRQ 2
is the PIC cascade and has no IOAPIC pin); 16-23 go to IOAPIC pins only.

CPU side (the engine, between translated blocks):

    intc.current_cpu = i          # before running vCPU i (per thread)
    intc.poll()                   # fire expired timers (a compare when none is due)
    if intc.take_nmi(i): ...      # NMI from an IPI
    if guest IF and intc.pending(i):
        vector = intc.acknowledge(i)   # -1: nothing after all
    idle: intc.next_deadline_ns()  -> sleep (host) or clock.advance_to (deterministic)

The local APIC page at 0xFEE00000 is one MMIO range for all vCPUs; the
device placed there (`lapic_window`) dispatches to `lapics[current_cpu]`.
`current_cpu` is thread-local, so it works both for one thread running
the vCPUs in turn (set it before each slice) and for a thread per vCPU
(set it once in each thread); it is 0 where never set.

`on_init(cpu)` / `on_sipi(cpu, vector)` are called when an INIT / Startup
IPI reaches a vCPU (APIC id = vCPU index at reset; the engine decides
whether that vCPU is waiting for a SIPI); `on_wake(cpu)` when an interrupt
or NMI becomes pending for a vCPU, so a halted one can resume.

Placement: `placements()` lists (bus, base, length, device, name) with bus
"io" or "mmio"; `attach(io_bus, mmio_bus)` inserts them all.  Devices
placed by attach() take `lock` around every access, as set_irq, poll and
acknowledge do, so other threads (the console's UART) may raise IRQs while
a vCPU runs.

Raises ConfigError for an IRQ number outside 0-23."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ...device import as_bool, as_list, restore_state, saved
from ...errors import ConfigError
from ...irq import IrqLine
from .clock import GuestClock
from .ioapic import IOAPIC_BASE, PINS, IoApic
from .lapic import (DM_EXTINT, DM_FIXED, DM_INIT, DM_LOWEST, DM_NMI, DM_SIPI, LAPIC_BASE, LAPIC_SIZE,
                    SH_ALL, SH_NONE, SH_OTHERS, SH_SELF, LocalApic)
from .pic import CASCADE_IRQ, PicPair
from .pit import Pit

log = logging.getLogger(__name__)

ISA_IRQS = 16
IOAPIC_MMIO_SIZE = 0x1000
PIT_ISA_IRQ, PIT_IOAPIC_PIN = 0, 2   # the MADT's interrupt source override


def ioapic_pin(irq: int) -> int | None:
    """The IOAPIC pin an ISA IRQ or GSI number arrives on (None: no pin)."""
    if irq == PIT_ISA_IRQ:
        return PIT_IOAPIC_PIN
    if irq == CASCADE_IRQ:
        return None
    return irq


class _Locked:
    """Bus view of a device that takes the platform lock on every access."""

    def __init__(self, device, lock):
        self.device = device
        self.lock = lock

    def __repr__(self) -> str:
        return f"_Locked({self.device!r})"

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            return self.device.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.device.write(offset, size, value)


class LapicWindow:
    """The 0xFEE00000 page: forwards to the calling vCPU's local APIC."""

    def __init__(self, intc: "PlatformInterrupts"):
        self.intc = intc

    def read(self, offset: int, size: int) -> int:
        return self.intc.lapics[self.intc.current_cpu].read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.intc.lapics[self.intc.current_cpu].write(offset, size, value)


class PlatformInterrupts:
    """PIC pair, PIT, IOAPIC (id = ncpus, as in the MADT) and `ncpus` local APICs."""

    STATE_VERSION = 1

    def __init__(self, ncpus: int, clock: GuestClock,
                 on_init: Callable[[int], None] | None = None,
                 on_sipi: Callable[[int, int], None] | None = None,
                 on_wake: Callable[[int], None] | None = None,
                 lock: threading.RLock | None = None):
        if ncpus < 1 or ncpus > 255:
            raise ConfigError(f"{ncpus} vCPUs: the xAPIC platform takes 1 to 255")
        self.ncpus = ncpus
        self.clock = clock
        self.on_init = on_init
        self.on_sipi = on_sipi
        self.on_wake = on_wake
        self.lock = lock or threading.RLock()
        self._tls = threading.local()
        self.pic = PicPair(on_intr=self._pic_intr)
        self.ioapic = IoApic(ncpus, self._deliver)
        self.lapics = [LocalApic(i, clock, self._send, self.ioapic.eoi, bsp=(i == 0))
                       for i in range(ncpus)]
        self.pit = Pit(clock, IrqLine(PIT_ISA_IRQ, self.set_irq))
        self.nmi = [False] * ncpus
        self.lapic_window = LapicWindow(self)
        self._deadline = 0                 # 0: recompute on the next poll
        self.delivered = [0] * ncpus       # interrupts acknowledged per vCPU
        self.pit.set_timer_listener(self._timers_changed)
        for i, lapic in enumerate(self.lapics):
            lapic.cpu = i                  # vCPU index (the guest may rewrite the APIC id)
            lapic.on_timer_change = self._timers_changed
            lapic.on_interrupt = (lambda i=i: self._wake(i))

    def __repr__(self) -> str:
        return f"PlatformInterrupts(cpus={self.ncpus}, pic_intr={self.pic.interrupt_pending()})"

    @property
    def current_cpu(self) -> int:
        return getattr(self._tls, "cpu", 0)

    @current_cpu.setter
    def current_cpu(self, cpu: int) -> None:
        self._tls.cpu = cpu

    # --- placement -----------------------------------------------------------------

    def placements(self) -> list[tuple[str, int, int, object, str]]:
        """(bus, base, length, device, name) for every register range."""
        out = [("io", base, length, dev, name) for base, length, dev, name in self.pic.ranges()]
        out += [("io", base, length, dev, name) for base, length, dev, name in self.pit.ranges()]
        out.append(("mmio", IOAPIC_BASE, IOAPIC_MMIO_SIZE, self.ioapic, "ioapic"))
        out.append(("mmio", LAPIC_BASE, LAPIC_SIZE, self.lapic_window, "lapic"))
        return out

    def attach(self, io_bus, mmio_bus) -> None:
        """Inserts every device at its PC address. Raises BusError on overlap."""
        for bus, base, length, dev, name in self.placements():
            (io_bus if bus == "io" else mmio_bus).insert(base, length, _Locked(dev, self.lock), name)

    # --- device side ------------------------------------------------------------------

    def set_irq(self, irq: int, level: int) -> None:
        """Drives ISA IRQ / GSI `irq` (see the module doc). Raises ConfigError
        for a number outside 0..23."""
        if not 0 <= irq < PINS:
            raise ConfigError(f"IRQ {irq}: the platform has GSIs 0-{PINS - 1}")
        with self.lock:
            if irq < ISA_IRQS:
                self.pic.set_irq(irq, level)
            pin = ioapic_pin(irq)
            if pin is not None:
                self.ioapic.set_irq(pin, level)

    def signal_msi(self, address: int, data: int) -> None:
        """An MSI: a device's write of `data` to `address` in the local APIC
        page (Intel SDM vol. 3, 11.11).  Address bits 19:12 are the
        destination, bit 2 logical mode; data bits 7:0 the vector, 10:8
        the delivery mode.  A message outside 0xFEExxxxx is dropped."""
        if address >> 20 != LAPIC_BASE >> 20:
            log.debug("MSI to %#x (not the local APIC page) dropped", address)
            return
        dest, logical = (address >> 12) & 0xFF, bool(address & 0x4)
        with self.lock:
            self._deliver(dest, logical, (data >> 8) & 0x7, data & 0xFF, False)

    def _pic_intr(self, level: bool) -> None:
        if level:
            for i, lapic in enumerate(self.lapics):
                if lapic.accepts_pic():
                    self._wake(i)

    def _wake(self, cpu: int) -> None:
        if self.on_wake is not None:
            self.on_wake(cpu)

    def _targets(self, src: LocalApic | None, dest: int, logical: bool, shorthand: int) -> list[LocalApic]:
        if shorthand == SH_SELF:
            return [src] if src is not None else []
        if shorthand == SH_ALL:
            return list(self.lapics)
        if shorthand == SH_OTHERS:
            return [lapic for lapic in self.lapics if lapic is not src]
        return [lapic for lapic in self.lapics if lapic.matches(dest, logical)]

    def _dispatch(self, targets: list[LocalApic], mode: int, vector: int, level: bool) -> None:
        if mode == DM_LOWEST:
            # One destination; arbitration by priority is not modelled:
            # the lowest APIC id among those addressed gets it.
            targets, mode = targets[:1], DM_FIXED
        for lapic in targets:
            if mode == DM_FIXED:
                lapic.accept(vector, level)
            elif mode == DM_NMI:
                self.nmi[lapic.cpu] = True
                self._wake(lapic.cpu)
            elif mode == DM_INIT:
                lapic.init_reset()
                if self.on_init is not None:
                    self.on_init(lapic.cpu)
            elif mode == DM_SIPI:
                if self.on_sipi is not None:
                    self.on_sipi(lapic.cpu, vector)
            elif mode == DM_EXTINT:
                log.debug("ExtINT delivery to APIC %d ignored (use LINT0)", lapic.apic_id)
            else:
                log.debug("delivery mode %d to APIC %d ignored", mode, lapic.apic_id)

    def _send(self, src: LocalApic, dest: int, logical: bool, shorthand: int, mode: int,
              vector: int, level: bool, assert_: bool) -> None:
        if mode == DM_INIT and level and not assert_:
            return                                 # INIT level de-assert: no effect
        self._dispatch(self._targets(src, dest, logical, shorthand), mode, vector, False)

    def _deliver(self, dest: int, logical: bool, mode: int, vector: int, level: bool) -> None:
        self._dispatch(self._targets(None, dest, logical, SH_NONE), mode, vector, level)

    # --- CPU side -----------------------------------------------------------------------

    def pending(self, cpu: int) -> bool:
        """Whether vCPU `cpu` has a maskable interrupt to take (when IF=1)."""
        lapic = self.lapics[cpu]
        return lapic.has_interrupt() or (self.pic.interrupt_pending() and lapic.accepts_pic())

    def acknowledge(self, cpu: int) -> int:
        """The vector vCPU `cpu` takes now (the 8259's, through LINT0 in
        virtual-wire mode, before its local APIC's), or -1 if none."""
        with self.lock:
            lapic = self.lapics[cpu]
            if self.pic.interrupt_pending() and lapic.accepts_pic():
                vector = self.pic.acknowledge()
            elif lapic.has_interrupt():
                vector = lapic.acknowledge()
            else:
                return -1
            self.delivered[cpu] += 1
            return vector

    def take_nmi(self, cpu: int) -> bool:
        """True (once) if an NMI was sent to vCPU `cpu`."""
        if self.nmi[cpu]:
            self.nmi[cpu] = False
            return True
        return False

    # --- timers ----------------------------------------------------------------------------

    def _timers_changed(self) -> None:
        self._deadline = 0

    def next_deadline_ns(self) -> int:
        """Guest ns of the next timer event (clock.NEVER if none is armed)."""
        if self._deadline == 0:
            self._deadline = min([self.pit.next_deadline_ns()] +
                                 [lapic.next_deadline_ns() for lapic in self.lapics])
        return self._deadline

    def poll(self, now_ns: int | None = None) -> bool:
        """Fires every timer due at `now_ns` (default: the clock's now);
        True if one fired. Cheap when nothing is due."""
        now = self.clock.now_ns() if now_ns is None else now_ns
        if self._deadline and now < self._deadline:
            return False
        with self.lock:
            fired = self.pit.poll(now)
            for lapic in self.lapics:
                fired = lapic.poll(now) or fired
            self._deadline = 0
            self.next_deadline_ns()
            return fired

    # --- whole platform --------------------------------------------------------------------

    def reset(self) -> None:
        with self.lock:
            self.pic.reset()
            self.pit.reset()
            self.ioapic.reset()
            for lapic in self.lapics:
                lapic.reset()
            self.nmi = [False] * self.ncpus
            self._deadline = 0

    def save(self) -> dict:
        with self.lock:
            return saved(self, {"pic": self.pic.save(), "pit": self.pit.save(),
                                "ioapic": self.ioapic.save(), "nmi": list(self.nmi),
                                "lapics": [lapic.save() for lapic in self.lapics]})

    def restore(self, state: dict) -> None:
        """Raises DeviceStateError, also for a state saved with another
        number of vCPUs."""
        with self.lock:
            restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        nmi = [as_bool(x) for x in as_list(state["nmi"], self.ncpus)]
        lapics = as_list(state["lapics"], self.ncpus)
        self.pic.restore(state["pic"])
        self.pit.restore(state["pit"])
        self.ioapic.restore(state["ioapic"])
        self.nmi = nmi
        for lapic, s in zip(self.lapics, lapics):
            lapic.restore(s)
        self._deadline = 0

    def stats(self) -> dict:
        return {"interrupts_delivered": list(self.delivered), "ioapic_deliveries": self.ioapic.delivered,
                "pit_irqs": self.pit.counters[0].delivered,
                "lapic_timer_fires": [lapic.timer_fired for lapic in self.lapics]}
