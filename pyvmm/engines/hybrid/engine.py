"""The `hybrid` engine: guest kernel code in bt, guest user code under KVM.

This is the design of VMware's binary-translation VMM: privileged code is
translated, user code runs directly on the CPU.  Here the translator is
pyvmm's bt engine (its vCPUs, scheduler, MMU and Python platform devices
all stay in charge) and "directly on the CPU" is KVM, which on every host
runs CPL3 code natively (kvm_pvm included, where it emulates CPL0).

The switch points:
- bt -> KVM: whenever a bt vCPU reaches CPL3 (iret/sysret/sysexit to user
  mode set `pending`, so the block loop returns at once), the scheduler's
  next run_blocks hands the vCPU to KVM (switch.UserSwitch.to_kvm) and
  runs it until something happens;
- KVM -> bt: a system call (exit at switch.SYSCALL_SENTINEL: bt executes the
  `syscall` itself), any exception or `int n` (a triple fault with RIP at
  the instruction: bt executes that instruction again and delivers the
  event through the guest's IDT; kvm_pvm leaves RIP after a 64-bit int3,
  int1 or `int 3`, which _trap_length recognises; a TF single-step #DB, seen
  in KVM's DR6.BS, is delivered at RIP), an instruction KVM cannot run, or a kick
  (the next timer deadline of the bt platform, an interrupt raised by
  another thread, a stop request): bt then delivers the interrupt.
  Port and MMIO exits from user code are served on the spot.

KVM caches the guest's page tables (kvm_pvm and any KVM without EPT/NPT
use shadow paging), and bt writes page tables behind its back, so every
entry to KVM after bt ran first drops KVM's shadow by re-registering the
memory slots (measured ~0.1-2 ms; a stale entry would let user code see a
page the kernel unmapped).

Limits: --deterministic is refused (user instructions under KVM are not
counted).  User-mode rdtsc is trapped (CR4.TSD, switch.py) so that it reads
bt's TSC."""

from __future__ import annotations

import ctypes
import errno
import logging
import threading
import time
from collections import Counter

from ...costs import Costs
from ...cpu import CpuState
from ...errors import ConfigError, EngineError
from ...boot import layout
from ..base import Engine
from ..bt.engine import BtEngine
from ..bt.faults import DB, GuestFault
from ..kvm import abi, cpuid, hostfit, state
from ..kvm.device import Kvm, _ioctl, ioctl
from ..kvm.dirtylog import KvmDirtyLog, register_memory
from ..kvm.engine import _install_kick_handler
from .alarm import Alarm
from .cpuid import kvm_entries
from .ptwatch import PageTableWatch
from .switch import DR6_BS, SYSCALL_SENTINEL, UserSwitch

log = logging.getLogger(__name__)

CR0_PE, CR0_PG, EFER_LMA = 1, 1 << 31, 1 << 10
RFLAGS_TF, RFLAGS_IF, RFLAGS_RF = 1 << 8, 1 << 9, 1 << 16
SYSCALL_BYTES = b"\x0f\x05"
MAX_STINT_S = 0.01        # longest KVM run while other vCPUs wait (several vCPUs)
# Shortest KVM run: a timer deadline already past (its interrupt not deliverable
# yet) must not end every run at once, or user code would never advance.
MIN_STINT_S = 0.001


class HybridEngine(Engine):
    name = "hybrid"

    def __init__(self, machine):
        super().__init__(machine)
        self.bt = BtEngine(machine)
        self.kvm: Kvm | None = None
        self.vm = None
        self.switches: list[UserSwitch] = []
        self.slots: list[abi.UserspaceMemoryRegion] = []
        self.dirty_log: KvmDirtyLog | None = None
        self.alarm = Alarm()
        self.events: Counter = Counter()     # user-mode exits by reason
        self.kvm_ns = 0                       # inside KVM_RUN (user code)
        self.switch_ns = 0                    # moving state and flushing KVM's MMU
        self.watch = PageTableWatch(machine.memory)
        self.code_seen: dict[int, bytes] = {}  # user instruction address (physical) -> bytes bt last ran there
        # False for a guest that booted elsewhere (an incoming migration from
        # bt or hw): its user space may read the TSC (vDSO), which KVM here
        # gives as the host's raw counter, so its user code stays in bt.
        self.user_in_kvm = True
        # Measured on kvm_pvm: a 64-bit user int3, int1 or `int 3` ends KVM_RUN with RIP after the
        # instruction and RF clear, where every fault leaves RIP at it with RF set (_trap_length).
        self.trap_leaves_rip_after = hostfit.kernel_mode_emulated()

    # -- setup ---------------------------------------------------------------
    @property
    def cpus(self):
        return self.bt.cpus

    def prepare(self) -> None:
        cfg = self.machine.config
        if getattr(cfg, "deterministic", False):
            raise ConfigError("--engine hybrid cannot run --deterministic: user code under KVM is not counted")
        self.bt.prepare()
        self.kvm = Kvm()
        if not self.kvm.check(abi.CAP_IMMEDIATE_EXIT):
            raise EngineError("KVM lacks immediate-exit support")
        self.vm = self.kvm.create_vm()
        for fn, arg in ((self.vm.set_identity_map_addr, layout.KVM_IDENTITY_MAP_ADDR),
                        (self.vm.set_tss_addr, layout.KVM_TSS_ADDR)):
            try:
                fn(arg)
            except OSError:
                pass      # only VT-x wants them
        # User code writes under KVM: its dirty log joins bt's (the kernel's writes).
        self.slots, self.dirty_log = register_memory(self.vm, self.machine.memory)
        for i in range(cfg.cpus):
            v = self.vm.create_vcpu(i)
            self._set_cpuid(v, i)
            v.set_msrs(dict(state.BOOT_MSRS))
            self.switches.append(UserSwitch(v))
        if not self.switches[0].cpuid_faulting:
            log.warning("hybrid: this host's KVM has no CPUID faulting: KVM answers user code's "
                        "CPUID from its copy of bt's table (docs/hybrid.md)")
        for c in self.bt.cpus:
            self._hook(c)
        wake = self.bt.intc.on_wake

        def on_wake(i: int) -> None:
            wake(i)
            self.alarm.fire_now()
        self.bt.intc.on_wake = on_wake
        _install_kick_handler()

    def _set_cpuid(self, v, i: int) -> None:
        """KVM's CPUID for vCPU i is bt's (hybrid/cpuid.py); where KVM refuses
        that table, KVM's own with the same features hidden (user code then
        may read the host's CPU where KVM has no CPUID faulting)."""
        try:
            v.set_cpuid(kvm_entries(self.bt.cpus[i].cpuid))
            return
        except OSError as e:
            log.warning("hybrid: KVM refused bt's CPUID table (%s): KVM keeps its own", e.strerror)
        cfg = self.machine.config
        v.set_cpuid(cpuid.guest_cpuid(self.kvm.supported_cpuid(), i, cfg.cpus,
                                      cpuid.expand_hidden(cfg.cpuid_hide)))

    def _hook(self, c) -> None:
        """Makes bt vCPU c stop at every entry to user mode and run user mode
        under KVM (instance attributes over BtCpu's methods)."""
        update_mode, run_blocks = c.update_mode, c.run_blocks

        def hooked_update_mode() -> None:
            update_mode()
            if c.cpl == 3 and self.user_in_kvm:
                c.pending = True      # end the block loop: user mode goes to KVM

        def hooked_run_blocks(count: int) -> None:
            if c.cpl == 3 and c.cr0 & CR0_PE and self.user_in_kvm:
                self._user(c)
            else:
                run_blocks(count)
        c.update_mode = hooked_update_mode
        c.jumps.keep = False      # user code under KVM may rewrite code pages bt set lookups aside for
        c.run_blocks = hooked_run_blocks

    def set_irq(self, gsi: int, level: int) -> None:
        self.bt.set_irq(gsi, level)

    def signal_msi(self, address: int, data: int) -> None:
        self.bt.signal_msi(address, data)

    def keep_user_code_in_bt(self, why: str) -> None:
        """Runs user code in bt as well from now on (the guest then runs
        as under bt, with hybrid's platform)."""
        if self.user_in_kvm:
            log.warning("hybrid: %s: its user code runs in bt too", why)
        self.user_in_kvm = False

    def load_state(self, cpu: int, st: CpuState) -> None:
        self.bt.load_state(cpu, st)

    def save_state(self, cpu: int) -> CpuState:
        return self.bt.save_state(cpu)

    # -- running -------------------------------------------------------------
    def run(self) -> None:
        self.alarm.start(threading.get_ident())
        try:
            self.bt.run()
        finally:
            self.alarm.stop()

    def kick(self) -> None:
        self.bt.kick()
        self.alarm.fire_now()

    def pause(self) -> bool:
        """bt's pause: the scheduler parks between slices; a vCPU in user
        mode under KVM is first brought back to bt by the kick (KVM_RUN
        returns EINTR, its registers move to the bt vCPU), so every vCPU's
        state is bt's while paused, and bt's clock (which trapped user
        rdtsc reads too) is held."""
        return self.bt.pause_with(self.kick)

    def resume(self) -> None:
        self.bt.resume()

    def _flush_kvm_mmu(self) -> None:
        """Drops every translation KVM cached from the guest's page tables.
        A deleted slot loses its dirty bitmap: it is harvested first."""
        memory = self.machine.memory
        if memory.dirty is not None:
            self.dirty_log.log_harvest(memory.dirty.add)
        for region in self.slots:
            size = region.memory_size
            region.memory_size = 0
            ioctl(self.vm.fd, abi.SET_USER_MEMORY_REGION, region)
            region.memory_size = size
            ioctl(self.vm.fd, abi.SET_USER_MEMORY_REGION, region)

    def _user(self, c) -> None:
        """Runs bt vCPU c's user code under KVM until an event, then hands
        the event to bt."""
        ns = time.perf_counter_ns
        sw = self.switches[c.index]
        v = sw.vcpu
        t0 = ns()
        user_cs, user_ss = c.seg[1], c.seg[2]
        user_bases = list(c.sb)
        user_rflags = c.rflags
        sw.to_kvm(c)
        if self.watch.needs_drop(c.cr3, bool(c.efer & EFER_LMA and c.cr0 & CR0_PG)):
            self._flush_kvm_mmu()
        delay = self._time_to_deadline()
        self.alarm.arm(v, delay)
        # An interrupt another thread raised after this slice began and before
        # arm() found no KVM run to cut short (fire_now saw no vCPU): without
        # this, bt would deliver it only at the next timer deadline.
        if self._interrupt_waits(c.index, user_rflags):
            v.run_mm[abi.RUN_IMMEDIATE_EXIT] = 1
        t1 = ns()
        event = self._run_kvm(v)
        t2 = ns()
        self.alarm.disarm()
        self.watch.after_run()
        regs = sw.regs_after_run()
        sw.to_bt(c)
        self.kvm_ns += t2 - t1
        self.switch_ns += (t1 - t0) + (ns() - t2)
        if event == "kick":
            self.events[event] += 1
        elif regs.rip == SYSCALL_SENTINEL:
            self.events["syscall"] += 1
            if regs.r11 & RFLAGS_TF:
                sw.took_single_step()   # bt runs the syscall again: drop the BS KVM may have set
            self._syscall(c, regs, user_cs, user_ss, user_bases, user_rflags)
        elif event == "trap" and regs.rflags & RFLAGS_TF and sw.took_single_step():
            # The #DB trap after an instruction KVM completed: nothing to run
            # again, bt delivers it at RIP as its own single-step does.
            self.events["single_step"] += 1
            c.dr[6] |= DR6_BS
            c.deliver(GuestFault(DB))
        else:
            self.events[event] += 1     # trap (exception, int n) or internal (KVM could not run it)
            if event == "trap":
                c.rip -= self._trap_length(c, regs)
            # With TF set, the instruction bt runs again is stepped as on the CPU:
            # a #DB after it unless it raised its own event (fault, int n).
            self._reexecute(c, step=bool(regs.rflags & RFLAGS_TF))

    def _interrupt_waits(self, i: int, rflags: int) -> bool:
        """Whether vCPU i has an NMI, or a maskable interrupt it would take now."""
        intc = self.bt.intc
        return bool(intc.nmi[i]) or bool(rflags & RFLAGS_IF) and intc.pending(i)

    def _trap_length(self, c, regs) -> int:
        """The length of the user int3, int1 or `int n` that KVM stopped
        just after (0: KVM stopped at a faulting instruction).  Only where
        measured (trap_leaves_rip_after): there RF tells the two apart (a
        fault keeps RF set, so one that follows an instruction ending in
        0xCC, such as `mov [rbp-0x34], eax` = 89 45 cc, is left alone); the
        bytes before RIP then say which instruction it was."""
        if not self.trap_leaves_rip_after or regs.rflags & RFLAGS_RF:
            return 0
        if self._byte_before(c, 1) in (0xCC, 0xF1):
            return 1
        return 2 if self._byte_before(c, 2) == 0xCD else 0

    def _byte_before(self, c, back: int) -> int | None:
        """The code byte `back` bytes before CS:RIP, None where it cannot be read."""
        try:
            pa = c.mmu.fetch((c.sb[1] + c.rip - back) & c.ipmask)
        except GuestFault:
            return None
        memory = self.machine.memory
        return memory.read(pa, 1)[0] if memory.is_ram(pa, 1) else None

    def _time_to_deadline(self) -> float:
        bt = self.bt
        deadline = bt.intc.next_deadline_ns()
        wait = (deadline - bt.clock.now_ns()) / 1e9 if deadline < (1 << 62) else 1.0
        if len(self.bt.cpus) > 1:
            wait = min(wait, MAX_STINT_S)
        return min(max(wait, MIN_STINT_S), 1.0)

    def _run_kvm(self, v) -> str:
        """KVM_RUN until an exit bt must handle; returns its name."""
        machine = self.machine
        mm = v.run_mm
        while machine.stop_status is None:
            r = _ioctl(v.fd, abi.RUN, None)
            if r < 0:
                err = ctypes.get_errno()
                if err in (errno.EINTR, errno.EAGAIN):
                    mm[abi.RUN_IMMEDIATE_EXIT] = 0
                    return "kick"
                raise EngineError(f"KVM_RUN (hybrid, vcpu{v.index}): {errno.errorcode.get(err, err)}")
            reason, direction, size, port, count, off = abi.IO_EXIT_WITH_REASON.unpack_from(mm, 0)
            if reason == abi.EXIT_IO:
                self.events["io"] += 1
                self._io(mm, direction, size, port, count, off)
            elif reason == abi.EXIT_MMIO:
                self.events["mmio"] += 1
                addr, data, length, is_write = abi.MMIO_EXIT.unpack_from(mm, abi.RUN_UNION)
                if is_write:
                    machine.mmio_bus.write(addr, length, int.from_bytes(data[:length], "little"))
                else:
                    value = machine.mmio_bus.read(addr, length)
                    mm[abi.RUN_UNION + 8:abi.RUN_UNION + 8 + length] = value.to_bytes(length, "little")
            elif reason == abi.EXIT_INTR:
                return "kick"
            elif reason == abi.EXIT_SHUTDOWN:
                return "trap"
            elif reason == abi.EXIT_INTERNAL_ERROR:
                return "internal"
            else:
                return abi.EXIT_NAMES.get(reason, str(reason))
        return "kick"

    def _io(self, mm, direction, size, port, count, off) -> None:
        bus = self.machine.io_bus
        end = off + size * count
        if count == 1:
            if direction == abi.IO_OUT:
                bus.write(port, size, int.from_bytes(mm[off:end], "little"))
            else:
                mm[off:end] = bus.read(port, size).to_bytes(size, "little")
        elif direction == abi.IO_OUT:       # rep outs/ins: the bus loops over the elements
            bus.write_many(port, size, mm[off:end])
        else:
            mm[off:end] = bus.read_many(port, size, count)

    def _syscall(self, c, regs, user_cs, user_ss, user_bases, user_rflags) -> None:
        """The guest executed `syscall` at RCX-2: run it in bt from the user
        state it had (RFLAGS from R11), so the kernel entry is bt's.  IF
        comes from the RFLAGS user mode was entered with unless IOPL is 3:
        below that CPL3 code cannot change it, and kvm_pvm (measured) puts
        IF=1 in R11 whatever the guest's IF is."""
        where = (regs.rcx - 2) & 0xFFFFFFFFFFFFFFFF
        c.seg[1], c.seg[2] = user_cs, user_ss
        c.sb[1], c.sb[2] = user_bases[1], user_bases[2]
        c.rip = where - c.sb[1]
        rflags = regs.r11
        if (user_rflags >> 12) & 3 < 3:
            rflags = (rflags & ~RFLAGS_IF) | (user_rflags & RFLAGS_IF)
        c.set_rflags(rflags)
        c.update_mode()
        self._reexecute(c)

    def _reexecute(self, c, step: bool = False) -> None:
        """Executes the instruction at CS:RIP in bt (it raises and delivers
        the event user code met under KVM), single-stepped where `step`.
        Its page's translations are dropped first: user code under KVM may
        have rewritten that page without bt seeing it."""
        try:
            pa = c.mmu.fetch((c.sb[1] + c.rip) & c.ipmask)
        except GuestFault:   # a fetch fault: execute_one delivers it
            pa = None
        if pa is not None and self.machine.memory.is_ram(pa, 1):
            now = self.machine.memory.read(pa, min(16, 0x1000 - (pa & 0xFFF)))
            if self.code_seen.get(pa) != now:
                c.translator.invalidate_page(pa >> 12)
                self.code_seen[pa] = now
        if step:
            c.single_step()
        else:
            c.execute_one()

    # -- reporting -----------------------------------------------------------
    def stats(self) -> dict:
        out = dict(self.bt.stats())
        out["engine"] = self.name
        out["user_exits"] = dict(self.events)
        out["user_seconds_in_kvm"] = round(self.kvm_ns / 1e9, 6)
        out["switch_seconds"] = round(self.switch_ns / 1e9, 6)
        out["kvm_mmu_drops"] = self.watch.drops
        return out

    def costs(self) -> Costs:
        c = self.bt.costs()
        c.engine = self.name
        c.exits = dict(c.exits)
        for k, n in self.events.items():
            c.exits[f"user_{k}"] = n
        c.guest_s += self.kvm_ns / 1e9
        c.vmm_s = max(c.vmm_s - self.kvm_ns / 1e9, 0.0)
        return c

    def close(self) -> None:
        if self.dirty_log in self.machine.memory.dirty_sources:
            self.machine.memory.dirty_sources.remove(self.dirty_log)
        self.alarm.stop()
        self.bt.close()
        for sw in self.switches:
            try:
                sw.vcpu.close()
            except (OSError, BufferError):
                pass
        self.switches = []
        for obj in (self.vm, self.kvm):
            if obj is not None:
                obj.close()
        self.vm = self.kvm = None

