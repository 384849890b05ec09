"""Scheduling the bt engine's vCPUs: one thread runs them in turn.

Why one thread: Python runs one thread at a time anyway (the GIL), so
threads per vCPU would add locking to every MMU and translation-cache
update without adding speed; round-robin slices keep runs reproducible
under --deterministic and make cross-vCPU coherence (code and page-table
write tracking, shadow.PageGuard) plain data-structure updates.

Each slice: set intc.current_cpu, fire due timers, deliver an NMI or an
external interrupt (IF=1 and no interrupt shadow), then run up to SLICE
blocks.  A vCPU that executed HLT sleeps until an interrupt is pending
for it; when all are idle the scheduler waits for the next timer deadline
(host time) or jumps the clock to it (deterministic time).

Application processors start in wait-for-SIPI; INIT puts one back there
and a Startup IPI starts it in real mode at CS = vector << 8, IP = 0."""

from __future__ import annotations

import logging
import threading

from ...cpu import CpuState, Segment
from ...errors import GuestCrash
from ...machine import StopReason
from . import debugregs
from . import flags as F
from .cpu import TripleFault
from .faults import NMI, GuestFault, SmcRestart

log = logging.getLogger(__name__)

SLICE = 200               # blocks per slice
MAX_IDLE_WAIT_S = 0.05    # longest host sleep before re-checking stop requests
NEVER = 1 << 63


def sipi_state(vector: int) -> CpuState:
    """Real-mode state an AP starts with after a Startup IPI."""
    st = CpuState()
    st.rip = 0
    st.cs = Segment(selector=vector << 8, base=vector << 12, limit=0xFFFF, type=0xB, s=1, present=1)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(st, name, Segment(selector=0, base=0, limit=0xFFFF, type=3, s=1, present=1))
    st.idt.base, st.idt.limit = 0, 0x3FF
    st.gdt.base, st.gdt.limit = 0, 0xFFFF
    st.cr0 = 0x60000010
    return st


class Scheduler:
    """Runs BtEngine's vCPUs round-robin until the machine stops."""

    def __init__(self, engine):
        self.engine = engine
        self.machine = engine.machine
        self.cpus = engine.cpus
        self.intc = engine.intc
        self.clock = engine.clock
        n = len(self.cpus)
        for c in self.cpus:
            c.yield_on_pause = n > 1
        self.waiting_sipi = [True] * n
        self._wake = threading.Event()
        self.idle_ns = 0          # deterministic: guest ns skipped while idle
        from .probe import Probe
        self.probe = Probe(self.cpus, self.clock)

    def __repr__(self) -> str:
        return f"Scheduler(cpus={len(self.cpus)}, waiting={self.waiting_sipi})"

    # -- callbacks (any thread) ------------------------------------------------
    def started(self, i: int) -> None:
        self.waiting_sipi[i] = False

    def on_init(self, i: int) -> None:
        if i == 0:
            log.debug("bt: INIT to the BSP ignored")
            return
        log.debug("bt: INIT to vCPU %d", i)
        self.waiting_sipi[i] = True
        self.cpus[i].halted = False

    def on_sipi(self, i: int, vector: int) -> None:
        if not self.waiting_sipi[i]:
            return
        log.debug("bt: SIPI to vCPU %d, vector %#x", i, vector)
        c = self.cpus[i]
        tsc_offset = c.tsc_offset
        c.load(sipi_state(vector))
        c.tsc_offset = tsc_offset
        c.halted = False
        self.waiting_sipi[i] = False
        self.on_wake(i)

    def on_wake(self, i: int) -> None:
        self.cpus[i].pending = True
        self._wake.set()

    def kick(self) -> None:
        for c in self.cpus:
            c.pending = True
        self._wake.set()

    # -- running ------------------------------------------------------------------
    def _interrupt(self, c) -> None:
        """Delivers an NMI or a maskable interrupt to c if one may be taken."""
        intc, i = self.intc, c.index
        if c.shadow_int:
            # STI / MOV SS hold interrupts off for one instruction: if one
            # waits, that instruction runs alone first, then it is taken.
            held = not c.halted and c.shadow_rip in (-1, c.rip)
            c.shadow_int, c.shadow_rip = False, -1
            if held:
                if not (intc.nmi[i] or c.rf & F.IF and intc.pending(i)):
                    return
                if debugregs.armed(c):
                    debugregs.step(c)
                elif c.rf & F.TF:
                    c.single_step()
                else:
                    c.execute_one()
        if intc.nmi[i] and intc.take_nmi(i):
            c.interrupts += 1
            c.deliver(GuestFault(NMI), external=True)
            return
        if c.rf & F.IF and intc.pending(i):
            vec = intc.acknowledge(i)
            if vec >= 0:
                c.interrupts += 1
                c.deliver(GuestFault(vec), external=True)

    def _slice(self, c) -> bool:
        """One slice of vCPU c; True if it ran guest code."""
        m = self.machine
        self.intc.current_cpu = c.index
        start = c.icount
        try:
            self._interrupt(c)
            if c.halted:
                return False
            c.pending = False
            c.shadow_int = False
            if debugregs.armed(c):      # DR7 enables a breakpoint: checked per instruction
                for _ in range(SLICE):
                    debugregs.step(c)
                    if c.halted or c.pending:
                        break
            elif c.rf & F.TF:
                c.single_step()         # a #DB trap after each instruction
            else:
                c.run_blocks(SLICE)
        except TripleFault:
            trail = "; ".join(f"vec={v} err={e} rip={r:#x} cpl={p} cr2={cr2 if cr2 is None else hex(cr2)}"
                              f"{' ext' if x else ''}" for v, e, r, p, cr2, x in c.trail)
            log.warning("bt: triple fault on vCPU %d at rip=%#x; last deliveries: %s", c.index, c.rip, trail)
            m.request_stop(StopReason.RESET, f"triple fault on vCPU {c.index} at rip={c.rip:#x}")
        except (GuestFault, SmcRestart) as e:  # pragma: no cover - defensive
            raise GuestCrash(f"bt: unhandled {e!r} at rip={c.rip:#x}") from None
        finally:
            if self.clock.deterministic:
                self.clock.advance_instructions(c.icount - start)
        return True

    def run(self) -> None:
        """Runs until machine.stop_status is set. Raises GuestCrash."""
        m = self.machine
        intc = self.intc
        cpus = self.cpus
        probe = self.probe
        gate = self.engine.gate
        try:
            while m.stop_status is None:
                if gate.closed:          # pause(): every vCPU is between slices here
                    self.engine.park()
                    continue
                probe.tick()
                ft = self.engine.ft
                if ft is not None:       # pyvmm/ft: log or replay outside inputs at this round's position
                    ft.round_top()
                    if m.stop_status is not None:
                        return
                ran = False
                for c in cpus:
                    if self.waiting_sipi[c.index]:
                        continue
                    intc.poll()
                    ran = self._slice(c) or ran
                    if m.stop_status is not None:
                        return
                    if gate.closed:
                        break
                if not ran and not gate.closed:   # a pause cut the round short: nobody halted for good
                    self._idle()
        finally:
            probe.finish()

    def _idle(self) -> None:
        """Every vCPU is halted or waiting for a SIPI: wait for an event."""
        m = self.machine
        intc = self.intc
        live = [c for c in self.cpus if not self.waiting_sipi[c.index]]
        if live and all(not c.rf & F.IF for c in live) and not any(intc.nmi):
            c = live[0]
            m.request_stop(StopReason.HALTED, f"hlt with interrupts off at {c.rip:#x}")
            return
        if any(intc.pending(c.index) and c.rf & F.IF for c in live) or any(intc.nmi):
            return
        deadline = intc.next_deadline_ns()
        now = self.clock.now_ns()
        if self.clock.deterministic and deadline < NEVER:
            self.idle_ns += deadline - now
            self.clock.advance_to(deadline)
            intc.poll()
            return
        wait = MAX_IDLE_WAIT_S if deadline >= NEVER else min(max(deadline - now, 0) / 1e9, MAX_IDLE_WAIT_S)
        if wait > 0:
            self._wake.wait(wait)
        self._wake.clear()
