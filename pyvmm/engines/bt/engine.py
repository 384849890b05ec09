"""BtEngine: runs guest code through the binary translator.

One vCPU (SMP comes later). The dispatcher looks up the block at CS:RIP,
runs it, and handles what blocks hand back: guest exceptions (delivered
through the IDT), writes to translated code (re-run on the single-instruction
path), HLT and stop requests."""

from __future__ import annotations

import logging
import threading

from ...cpu import CpuState
from ...errors import EngineError, GuestCrash
from ...machine import EXIT_HALTED, StopReason
from ..base import Engine
from . import flags as F
from .cpu import TripleFault, VCpu
from .faults import GuestFault, SmcRestart
from .translator import Translator

log = logging.getLogger(__name__)


class BtCpu(VCpu):
    """A VCpu with its translation cache and a single-instruction path."""

    def __init__(self, memory, io_bus, mmio_bus):
        super().__init__(memory, io_bus, mmio_bus, on_code_write=self._code_written)
        self.translator = Translator(self)
        memory.write_listeners.append(self._vmm_write)

    def _code_written(self, ppn: int) -> None:
        self.translator.invalidate_page(ppn)

    def _vmm_write(self, gpa: int, length: int) -> None:
        self.translator.invalidate_range(gpa, length)

    def detach(self) -> None:
        try:
            self.memory.write_listeners.remove(self._vmm_write)
        except ValueError:
            pass

    def step(self, single: bool = False) -> None:
        """Runs one block (or one instruction), delivering any guest exception.

        Raises TripleFault when an exception cannot be delivered."""
        try:
            fn = self.translator.lookup(single)
            fn(self)
        except GuestFault as f:
            self.deliver(f)
        except SmcRestart:
            self.mmu.smc_ok = True
            try:
                self.translator.lookup(True)(self)
            except GuestFault as f:
                self.deliver(f)
            finally:
                self.mmu.smc_ok = False

    def execute_one(self) -> None:
        """Executes exactly one instruction (exceptions are delivered)."""
        self.mmu.smc_ok = True
        try:
            self.step(single=True)
        finally:
            self.mmu.smc_ok = False


def execute_one(state: CpuState, memory, io_bus, mmio_bus) -> CpuState:
    """Runs one instruction from `state` against memory and buses; returns the
    new state (for instructions another engine cannot complete)."""
    cpu = BtCpu(memory, io_bus, mmio_bus)
    try:
        cpu.load(state)
        cpu.execute_one()
        return cpu.save()
    finally:
        cpu.detach()


class BtEngine(Engine):
    name = "bt"

    def __init__(self, machine):
        super().__init__(machine)
        self.cpus: list[BtCpu] = []
        self.irq_levels: dict[int, int] = {}
        self._wake = threading.Event()

    def prepare(self) -> None:
        m = self.machine
        if m.config.cpus != 1:
            raise EngineError("the bt engine runs one vCPU for now")
        self.cpus = [BtCpu(m.memory, m.io_bus, m.mmio_bus)]

    def set_irq(self, gsi: int, level: int) -> None:
        self.irq_levels[gsi] = level
        if level:
            self._wake.set()
            for c in self.cpus:
                c.pending = True

    def load_state(self, cpu: int, state: CpuState) -> None:
        self.cpus[cpu].load(state)
        self.cpus[cpu].translator.flush()

    def save_state(self, cpu: int) -> CpuState:
        return self.cpus[cpu].save()

    def kick(self) -> None:
        for c in self.cpus:
            c.pending = True
        self._wake.set()

    def run(self) -> None:
        m = self.machine
        c = self.cpus[0]
        while m.stop_status is None:
            c.pending = False
            try:
                for _ in range(256):
                    c.step()
                    if c.halted or c.pending:
                        break
            except TripleFault:
                m.request_stop(StopReason.RESET, 0, "triple fault")
                break
            except (GuestFault, SmcRestart) as e:  # pragma: no cover - defensive
                raise GuestCrash(f"bt: unhandled {e!r} at rip={c.rip:#x}") from None
            if c.halted:
                if not c.rf & F.IF:
                    m.request_stop(StopReason.HALTED, EXIT_HALTED, f"hlt with interrupts off at {c.rip:#x}")
                    break
                # No interrupt controller yet: wait for set_irq/kick.
                self._wake.wait(0.05)
                self._wake.clear()
                if any(self.irq_levels.values()) or m.stop_status is not None:
                    c.halted = False

    def stats(self) -> dict:
        if not self.cpus:
            return {}
        c = self.cpus[0]
        t = c.translator
        return {"instructions": c.icount, "translations": t.translated, "invalidations": t.invalidated,
                "cached_blocks": len(t.cache), "page_walks": c.mmu.walks}

    def close(self) -> None:
        for c in self.cpus:
            c.detach()
