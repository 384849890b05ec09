"""BtEngine: runs guest code through the binary translator.

The dispatcher looks up the block at CS:RIP, runs it, and handles what
blocks hand back: guest exceptions (delivered through the IDT), writes to
translated code (re-run on the single-instruction path), HLT and stop
requests.  Between slices of blocks it polls the platform timers and
delivers NMIs and external interrupts (smp.py: scheduling, INIT/SIPI,
halting and guest time)."""

from __future__ import annotations

import logging
import time

from ...costs import Costs
from ...cpu import CpuState
from ...errors import EngineError
from ...runstate import PauseGate
from ..base import Engine
from .cpu import VCpu
from .cpuid import CpuidTable
from .faults import DB, ApicRestart, GuestFault, SmcRestart
from .jumpcache import JumpCaches
from .shadow import PageGuard
from .translator import Translator

log = logging.getLogger(__name__)

MMU_MODES = ("shadow", "nested")
DR6_BS = 1 << 14             # DR6: the #DB came from single-stepping


class BtCpu(VCpu):
    """A VCpu with its translation cache and a single-instruction path."""

    def __init__(self, memory, io_bus, mmio_bus, guard: PageGuard | None = None,
                 shadow: bool = False, index: int = 0):
        super().__init__(memory, io_bus, mmio_bus, on_code_write=self._code_written,
                         guard=guard, shadow=shadow, index=index)
        self.cpuid = CpuidTable(index)    # the default model; prepare() gives the configured one
        self.translator = Translator(self)
        self.jumps = JumpCaches()
        self.jmp = self.mmu.jmp = self.jumps.new()
        if guard is not None:
            guard.code_listeners.append(self._code_written)
        memory.write_listeners.append(self._vmm_write)
        self.faults = 0              # exceptions delivered (all vectors)
        self.interrupts = 0          # external interrupts and NMIs delivered
        self.smc_restarts = 0        # instructions re-run alone after writing their own code page
        self.apic_restarts = 0       # local APIC writes re-run alone so an interrupt is taken next
        self.blocks_ns = 0           # host time inside run_blocks (translated code + lookups)

    def update_mode(self) -> None:
        """VCpu.update_mode, keeping the block lookup cache when neither the
        mode nor the address space changed (a mov to CR3 of the same value in
        shadow mode, cli/sti-free popf...): its entries stay valid then, since
        code writes, page-table writes and invlpg clear it themselves.  A
        real switch (system call, interrupt, return) sets the cache aside
        for the way back (jumpcache.py)."""
        keep = self.jmp
        mode, maps, flushes = self.mode, self.mmu.maps, self.mmu.tlb_flushes
        self.jmp = self.mmu.jmp = {}       # what the base class clears
        m = self.mmu
        try:
            super().update_mode()
        finally:
            same_maps = m.tlb_flushes == flushes and m.shadow
            if not (self.mode == mode and m.maps is maps and same_maps):
                keep = self.jumps.switch(keep, mode, maps, self.mode, m.maps, m.tlb_flushes, same_maps)
            self.jmp = m.jmp = keep

    def _code_written(self, ppn: int) -> None:
        self.translator.invalidate_page(ppn)
        self.jmp.clear()

    def _vmm_write(self, gpa: int, length: int) -> None:
        t = self.translator
        before = t.invalidated
        t.invalidate_range(gpa, length)
        if t.invalidated != before:
            self.jmp.clear()

    def detach(self) -> None:
        try:
            self.memory.write_listeners.remove(self._vmm_write)
        except ValueError:
            pass

    def step(self, single: bool = False) -> None:
        """Runs one block (or one instruction), delivering any guest exception.

        Raises TripleFault when an exception cannot be delivered."""
        try:
            if single:
                fn = self.translator.lookup(True)
            else:
                la = (self.sb[1] + self.rip) & self.ipmask
                fn = self.jmp.get(la)
                if fn is None:
                    fn = self.jmp[la] = self.translator.lookup()
            fn(self)
        except GuestFault as f:
            self.faults += 1
            self.deliver(f)
        except SmcRestart as e:
            self._smc_restart(e)

    def _smc_restart(self, why: SmcRestart) -> None:
        """Re-runs, alone, an instruction that wrote to a page of translated
        code (or to the local APIC: faults.ApicRestart)."""
        if isinstance(why, ApicRestart):
            self.apic_restarts += 1
        else:
            self.smc_restarts += 1
        self.mmu.smc_ok = True
        try:
            self.translator.lookup(True)(self)
        except GuestFault as f:
            self.faults += 1
            self.deliver(f)
        finally:
            self.mmu.smc_ok = False

    def run_blocks(self, count: int) -> None:
        """Runs up to `count` blocks, stopping early at HLT or when asked
        (pending). Guest exceptions are delivered; raises TripleFault."""
        sb, lookup = self.sb, self.translator.lookup
        t0 = time.perf_counter_ns()
        try:
            for _ in range(count):
                la = (sb[1] + self.rip) & self.ipmask
                jmp = self.jmp          # a mode switch may have swapped it (jumpcache.py)
                fn = jmp.get(la)
                if fn is None:
                    fn = jmp[la] = lookup()
                fn(self)
                if self.halted or self.pending:
                    return
        except GuestFault as f:
            self.faults += 1
            self.deliver(f)
        except SmcRestart as e:
            self._smc_restart(e)
        finally:
            self.blocks_ns += time.perf_counter_ns() - t0

    def single_step(self) -> None:
        """One instruction with RFLAGS.TF set: it runs alone, then the
        single-step #DB trap follows with DR6.BS set, unless the instruction
        delivered an exception or interrupt itself (SDM Vol. 3, 18.3.1.4),
        or loaded SS (mov/pop ss hold the trap until after the next
        instruction, SDM Vol. 3, 6.8.3), or was a syscall/sysret, which
        test TF after they complete (system._single_step_after).  Raises
        TripleFault."""
        before = self.deliveries
        self.ss_shadow = self.step_owned = False
        self.execute_one()
        if self.deliveries == before and not self.ss_shadow and not self.step_owned:
            self.dr[6] |= DR6_BS
            self.deliver(GuestFault(DB))

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
    """The bt engine: vCPUs run in turn in the thread that calls run().

    The machine's platform (machine.devices "intc" and "clock", placed by
    the builder) supplies interrupts and time; without one (bare test
    machines) a private platform is made and attached here."""
    name = "bt"

    def __init__(self, machine):
        super().__init__(machine)
        self.cpus: list[BtCpu] = []
        self.guard = PageGuard()
        self.intc = None
        self.clock = None
        self.sched = None
        self.store = None     # blockstore.BlockStore when config.block_store names a directory
        self.run_ns = 0       # host time inside run()
        self.idle_ns = 0      # of which waiting with every vCPU halted
        self.gate = PauseGate()   # the scheduler parks here at a slice end (pause())
        self.ft = None            # pyvmm/ft's Recorder or Replayer: called before every round

    def prepare(self) -> None:
        """Creates the vCPUs. Raises EngineError / ConfigError for a bad setup."""
        from .smp import Scheduler
        m = self.machine
        mode = getattr(m.config, "mmu", "shadow")
        if mode not in MMU_MODES:
            raise EngineError(f"bt: unknown MMU mode {mode!r} (choose from {', '.join(MMU_MODES)})")
        self.intc = m.devices.get("intc")
        self.clock = m.devices.get("clock")
        if self.intc is None:
            from .platform import make_platform
            self.clock, self.intc = make_platform(m)
        m.memory.write_ignored_listeners.append(self.guard.unmap_pages)   # PAM made them read-only
        n = m.config.cpus
        hide = list(getattr(m.config, "cpuid_hide", []) or [])
        for i in range(n):
            c = BtCpu(m.memory, m.io_bus, m.mmio_bus, self.guard, mode == "shadow", i)
            c.clock = self.clock
            c.lapic = self.intc.lapics[i]
            c.intc = self.intc
            c.mmu.lapic = c.lapic
            c.cpuid = CpuidTable(i, n, hide, getattr(m.config, "cpu_model", "v3"))
            self.cpus.append(c)
        m.memory.dirty_sources.append(self.guard)    # the translator's writes feed the dirty log
        if getattr(m.config, "kvmclock", True) and m.config.engine == "bt":
            from .kvmpv import attach           # not under hybrid: user code reads the host TSC
            attach(self)
        self.store = self._open_store(getattr(m.config, "block_store", None))
        for c in self.cpus:
            c.translator.store = self.store
        self.sched = Scheduler(self)
        self._time_idle(self.sched)
        self.intc.on_init = self.sched.on_init
        self.intc.on_sipi = self.sched.on_sipi
        self.intc.on_wake = self.sched.on_wake

    @staticmethod
    def _open_store(directory: str | None):
        """The on-disk block store (blockstore.py), or None when off or unusable."""
        if not directory:
            return None
        from .blockstore import BlockStore
        store = BlockStore(directory)
        return store if store.enabled else None

    def set_irq(self, gsi: int, level: int) -> None:
        self.intc.set_irq(gsi, level)

    def signal_msi(self, address: int, data: int) -> None:
        self.intc.signal_msi(address, data)

    def load_state(self, cpu: int, state: CpuState) -> None:
        self.cpus[cpu].load(state)
        if state.fxsave is not None:
            from .fxstate import from_fxsave
            from_fxsave(self.cpus[cpu], state.fxsave)
        self.cpus[cpu].xcr0 = state.xcr0
        if state.ymmh is not None:
            self.cpus[cpu].ymmh = list(state.ymmh)
        self.cpus[cpu].halted = False
        self.cpus[cpu].translator.flush()
        self.cpus[cpu].jmp.clear()
        if self.sched is not None:
            self.sched.started(cpu)

    def save_state(self, cpu: int) -> CpuState:
        from .fxstate import to_fxsave
        st = self.cpus[cpu].save()
        st.fxsave = to_fxsave(self.cpus[cpu])
        st.xcr0, st.ymmh = self.cpus[cpu].xcr0, list(self.cpus[cpu].ymmh)
        return st

    def kick(self) -> None:
        if self.sched is not None:
            self.sched.kick()
        self.gate.wake()

    # -- pause and resume (runstate.py) -------------------------------------------
    def pause(self) -> bool:
        return self.pause_with(self.kick)

    def pause_with(self, kick) -> bool:
        """pause(), ending the current slice with `kick` (hybrid's also ends
        a KVM run). The one scheduler thread parks between slices, where
        every vCPU is at an instruction boundary with its state in BtCpu;
        then the guest clock (timers, TSC, kvmclock) is held."""
        if not self.gate.close(1, kick, lambda: self.machine.stop_status is not None):
            return False
        self.clock.pause()
        return True

    def resume(self) -> None:
        self.clock.resume()
        self.gate.open()

    def park(self) -> None:
        """Called by the scheduler between slices: waits while paused."""
        self.gate.park(lambda: self.machine.stop_status is not None)

    def run(self) -> None:
        """Runs until a stop request. Raises GuestCrash if the engine cannot go on."""
        t0 = time.perf_counter_ns()
        try:
            self.sched.run()
        finally:
            self.run_ns += time.perf_counter_ns() - t0

    def _time_idle(self, sched) -> None:
        """Wraps the scheduler's idle wait so its host time is counted apart."""
        idle = sched._idle

        def timed_idle() -> None:
            t0 = time.perf_counter_ns()
            try:
                idle()
            finally:
                self.idle_ns += time.perf_counter_ns() - t0
        sched._idle = timed_idle

    def costs(self) -> Costs:
        """Translations, invalidations, shadow faults, interrupts, and time in
        translated code vs translation and dispatch (costs.py)."""
        cs = self.cpus
        translate = sum(c.translator.translate_ns for c in cs)
        blocks = sum(c.blocks_ns for c in cs)
        guest = max(blocks - translate, 0)
        exits = {"exception": sum(c.faults for c in cs), "interrupt": sum(c.interrupts for c in cs),
                 "smc_restart": sum(c.smc_restarts for c in cs)}
        return Costs(engine=self.name, exits={k: v for k, v in exits.items() if v},
                     instructions=sum(c.icount for c in cs),
                     translations=sum(c.translator.translated for c in cs),
                     invalidations=sum(c.translator.invalidated for c in cs),
                     shadow_faults=sum(c.mmu.shadow_fills for c in cs),
                     interrupts=sum(c.interrupts for c in cs), exceptions=sum(c.faults for c in cs),
                     guest_s=guest / 1e9, idle_s=self.idle_ns / 1e9, translate_s=translate / 1e9,
                     vmm_s=max(self.run_ns - guest - self.idle_ns, 0) / 1e9)

    # -- for installers of guest interfaces (engines/base.py; bt/services.py)
    def add_cpuid_leaves(self, leaves, hypervisor_bit: bool = False) -> None:
        from . import services
        services.add_cpuid_leaves(self, leaves, hypervisor_bit)

    def cpuid_leaf(self, leaf: int) -> tuple[int, int, int, int]:
        from . import services
        return services.cpuid_leaf(self, leaf)

    def guest_clock_hz(self) -> tuple[int, int]:
        from . import services
        return services.clock_hz()

    def attach_hypercalls(self, hv, msr: int) -> bool:
        from . import services
        services.attach_hypercalls(self, hv, msr)
        return True

    def port_caller(self, ports):
        from . import services
        return services.port_caller(self, ports)

    def stats(self) -> dict:
        if not self.cpus:
            return {}
        cs = self.cpus
        mm = [c.mmu for c in cs]
        ts = [c.translator for c in cs]
        out = {
            "instructions": sum(c.icount for c in cs),
            "blocks_translated": sum(t.translated for t in ts),
            "blocks_compiled": sum(t.compiled for t in ts),      # the rest ran on the cold path only
            "blocks_loaded": sum(t.loaded for t in ts),          # or came from the block store
            "cache_invalidations": sum(t.invalidated for t in ts),
            "cached_blocks": sum(len(t.cache) for t in ts),
            "translations": sum(t.translated for t in ts),       # older names of the two above
            "invalidations": sum(t.invalidated for t in ts),
            "mmu_mode": "shadow" if mm[0].shadow else "nested",
            "page_walks": sum(m.walks for m in mm),
            "shadow_fills": sum(m.shadow_fills for m in mm),
            "shadow_resyncs": self.guard.resyncs,
            "shadow_syncs": self.guard.syncs,        # out-of-sync page tables compared at flushes
            "shadow_global_hits": sum(m.globals.hits for m in mm),   # misses served by shared global entries
            "page_table_writes": self.guard.table_writes,
            "tlb_flushes": sum(m.tlb_flushes for m in mm),
            "guest_page_faults": sum(m.page_faults for m in mm),
            "exceptions_delivered": sum(c.faults for c in cs),
            "jump_caches_reused": sum(c.jumps.reused for c in cs),   # mode switches that kept their lookups
            "interrupts_delivered": sum(c.interrupts for c in cs),
            "per_cpu_instructions": [c.icount for c in cs],
            "guest_ns": self.clock.now_ns() if self.clock is not None else 0,
        }
        if self.intc is not None:
            out["platform"] = self.intc.stats()
        if self.store is not None:
            out["block_store"] = self.store.stats()
        return out

    def close(self) -> None:
        sources = self.machine.memory.dirty_sources
        if self.guard in sources:
            sources.remove(self.guard)
        for c in self.cpus:
            c.detach()
        if self.store is not None:
            self.store.close()
