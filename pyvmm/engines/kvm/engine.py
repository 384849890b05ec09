"""The `hw` engine: one host thread per vCPU, each looping on KVM_RUN and
sending the exits the VMM must see to the machine's buses."""

from __future__ import annotations

import ctypes
import errno
import logging
import signal
import threading
import time

from ...costs import Costs
from ...cpu import CpuState
from ...errors import EngineError, GuestCrash
from ...machine import StopReason
from ...runstate import PauseGate
from ...boot import layout
from ..base import Engine
from . import abi, cpuid, state
from .dirtylog import KvmDirtyLog, register_memory
from .shadowslots import SHADOW_RANGES, ShadowSlots
from .device import Kvm, KvmVcpu, KvmVm, _ioctl, ioctl

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
SAMPLE_EVERY = 16  # KVM_RUN calls per timed one (guest-time accounting)


def _install_kick_handler() -> None:
    # The handler does nothing: the signal exists only to interrupt a KVM_RUN
    # blocked in another thread (it returns EINTR). Python's own handler is
    # installed process-wide, so any thread's syscall is interrupted.
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class KvmEngine(Engine):
    name = "hw"

    def __init__(self, machine):
        super().__init__(machine)
        self.irqchip = machine.config.irqchip
        self.kvm: Kvm | None = None
        self.vm: KvmVm | None = None
        self.vcpus: list[KvmVcpu] = []
        self.slots: list[abi.UserspaceMemoryRegion] = []
        self.dirty_log: KvmDirtyLog | None = None
        self.shadow: ShadowSlots | None = None
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        self.exit_counts: list[list[int]] = []
        self.guest_time = 0.0
        # Interrupts pyvmm injected by ioctl (KVM_IRQ_LINE, KVM_SIGNAL_MSI);
        # those through irqfd (devices/virtio/kvm_eventfds.py) are not counted.
        self.irq_injections = 0
        # Handlers for further exit reasons, fn(vcpu), and the vCPU of the calling thread.
        self.exit_hooks: dict = {}
        self.current = threading.local()
        # Nanoseconds each vCPU thread spent inside KVM_RUN (guest, or the host
        # kernel running it) and in its exit loop overall: the rest is pyvmm.
        self.run_ns: list[int] = []       # the timed KVM_RUNs (one in SAMPLE_EVERY)
        self.handle_ns: list[int] = []    # the handling of those same exits
        self.loop_ns: list[int] = []
        # Complete instructions KVM cannot emulate (completion.py); off, such
        # an exit ends the VM with a crash report as before.
        self.complete_instructions = machine.config.complete_instructions
        self.completer = None
        # Called in the vCPU's thread after a kick interrupted KVM_RUN: the one
        # place another thread can have the vCPU's registers read (profiling).
        self.on_kick = None
        self.gate = PauseGate()           # vCPU threads park here while paused
        self._paused_clock_ns: int | None = None   # kvmclock when paused
        self._paused_pit: bytes | None = None      # the in-kernel PIT when paused

    # -- setup ---------------------------------------------------------------
    def prepare(self) -> None:
        cfg = self.machine.config
        self.kvm = Kvm()
        for cap, what in ((abi.CAP_USER_MEMORY, "user memory"), (abi.CAP_IMMEDIATE_EXIT, "immediate exit")):
            if not self.kvm.check(cap):
                raise EngineError(f"KVM lacks {what} support")
        max_vcpus = self.kvm.check(abi.CAP_MAX_VCPUS) or self.kvm.check(abi.CAP_NR_VCPUS) or 4
        if cfg.cpus > max_vcpus:
            raise EngineError(f"KVM supports at most {max_vcpus} vCPUs, {cfg.cpus} asked")
        hidden = cpuid.expand_hidden(cfg.cpuid_hide)
        self.vm = self.kvm.create_vm()
        for what, fn, arg in (("KVM_SET_IDENTITY_MAP_ADDR", self.vm.set_identity_map_addr, layout.KVM_IDENTITY_MAP_ADDR),
                              ("KVM_SET_TSS_ADDR", self.vm.set_tss_addr, layout.KVM_TSS_ADDR)):
            try:
                fn(arg)
            except OSError as e:  # not needed (or not offered) outside Intel VT-x
                log.debug("%s: %s", what, e.strerror)
        self.slots, self.dirty_log = register_memory(self.vm, self.machine.memory, split=SHADOW_RANGES)
        # PAM-protected shadow RAM: writes dropped, as under bt.
        self.shadow = ShadowSlots(self.kvm, self.vm.fd, self.machine.memory, self.slots, self.dirty_log)
        if self.irqchip:
            try:
                self.vm.create_irqchip()
                self.vm.create_pit2()
            except OSError as e:
                raise EngineError(f"KVM in-kernel irqchip: {e.strerror}") from None
        supported = self.kvm.supported_cpuid()
        for i in range(cfg.cpus):
            vcpu = self.vm.create_vcpu(i)
            vcpu.set_cpuid(cpuid.guest_cpuid(supported, i, cfg.cpus, hidden))
            vcpu.set_msrs(dict(state.BOOT_MSRS))
            self.vcpus.append(vcpu)
            self.exit_counts.append([0] * 32)
            self.run_ns.append(0)
            self.handle_ns.append(0)
            self.loop_ns.append(0)
        _install_kick_handler()

    def load_state(self, cpu: int, st: CpuState) -> None:
        state.load(self.vcpus[cpu], st)
        if st.fxsave is None:
            # A boot state has no FPU image: give the reset values explicitly,
            # since KVM_GET_FPU on this host reads MXCSR 0 from a fresh vCPU.
            self.vcpus[cpu].set_fpu(state.fpu_from_fxsave(state.RESET_FXSAVE))
        if self.irqchip and cpu == 0:
            self.vcpus[0].set_mp_state(abi.MP_STATE_RUNNABLE)

    def save_state(self, cpu: int) -> CpuState:
        return state.save(self.vcpus[cpu])

    def set_irq(self, gsi: int, level: int) -> None:
        if self.irqchip and self.vm is not None:
            self.irq_injections += 1
            self.vm.irq_line(gsi, level)

    def signal_msi(self, address: int, data: int) -> None:
        if self.irqchip and self.vm is not None:
            self.irq_injections += 1
            self.vm.signal_msi(address, data)

    # -- running -------------------------------------------------------------
    def run(self) -> None:
        machine = self.machine
        self._threads = [threading.Thread(target=self._thread_main, args=(v,), name=f"vcpu{v.index}", daemon=True)
                         for v in self.vcpus]
        start = time.perf_counter()
        for t in self._threads:
            t.start()
        try:
            machine.wait_stopped()
        finally:
            self.kick()
            for t in self._threads:
                while t.is_alive():
                    t.join(0.05)
                    if t.is_alive():
                        self._kick_thread(t)
            self.guest_time = time.perf_counter() - start
        if self._error is not None:
            raise self._error

    def kick(self) -> None:
        for v in self.vcpus:
            v.run_mm[abi.RUN_IMMEDIATE_EXIT] = 1
        for t in self._threads:
            self._kick_thread(t)
        self.gate.wake()

    # -- pause and resume (runstate.py) -------------------------------------------
    def pause(self) -> bool:
        """Each vCPU thread parks when its KVM_RUN returns EINTR (the kick's
        immediate_exit): KVM has then completed any I/O it exited for, so
        the registers are at an instruction boundary and readable from
        here. kvmclock and the in-kernel PIT are read so that resume() can
        give them back."""
        if not self.gate.close(len(self.vcpus), self.kick, self._stopping):
            return False
        self._paused_clock_ns = self.kvm_clock()
        self._paused_pit = self._pit_state()
        return True

    def resume(self) -> None:
        """Loads kvmclock with its value at pause (KVM_SET_CLOCK), so the
        guest's time skips the pause, and the PIT as it was (KVM_SET_PIT2),
        then lets the vCPUs go on. (The TSC itself runs on; Linux keeps time
        by kvmclock when it has it.)"""
        if self._paused_clock_ns is not None:
            self.kvm_clock(self._paused_clock_ns)
            self._paused_clock_ns = None
        if self._paused_pit is not None:
            self._pit_state(self._paused_pit)
            self._paused_pit = None
        self.gate.open()

    def _pit_state(self, load: bytes | None = None) -> bytes | None:
        """The in-kernel PIT's state (KVM_GET_PIT2), or loads `load`; None
        without the irqchip or where KVM refuses.  KVM's PIT runs on host
        time and re-injects the ticks the guest missed, so a pause would
        end in a burst of them (a second's worth for a one-second pause):
        KVM_SET_PIT2 reloads each channel's count, restarting channel 0's
        period, and drops the ticks that piled up (at most one, latched in
        the 8259 during the pause, remains).  The local APIC timer needs no
        such care: KVM coalesces its missed periods into one (measured on
        kvm_pvm: 51 ticks at 100 Hz in the 0.5 s after a 1 s pause), and its
        current count runs on while paused, which only shifts its phase."""
        if not self.irqchip or self.vm is None:
            return None
        from .platform_state import GET_PIT2, SET_PIT2, _Pit2
        try:
            if load is None:
                buf = _Pit2()
                ioctl(self.vm.fd, GET_PIT2, buf)
                return bytes(buf)
            ioctl(self.vm.fd, SET_PIT2, _Pit2.from_buffer_copy(load))
            return load
        except OSError as e:
            log.debug("KVM PIT: %s", e.strerror)
            return None

    def _stopping(self) -> bool:
        return self.machine.stop_status is not None

    def kvm_clock(self, set_ns: int | None = None) -> int | None:
        """kvmclock's guest ns (KVM_GET_CLOCK), or sets it; None where this
        KVM refuses."""
        from .platform_state import GET_CLOCK, SET_CLOCK, _ClockData
        data = _ClockData()
        try:
            if set_ns is None:
                ioctl(self.vm.fd, GET_CLOCK, data)
                return data.clock
            data.clock = set_ns
            ioctl(self.vm.fd, SET_CLOCK, data)
            return set_ns
        except OSError as e:
            log.debug("KVM clock: %s", e.strerror)
            return None

    def interrupt(self) -> None:
        """Makes every vCPU leave KVM_RUN once (on_kick runs) without stopping."""
        self.kick()

    @staticmethod
    def _kick_thread(t: threading.Thread) -> None:
        if t.ident is not None and t.is_alive() and t is not threading.current_thread():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def _thread_main(self, vcpu: KvmVcpu) -> None:
        self.current.vcpu = vcpu   # for devices that need the calling vCPU (paravirt doorbell)
        try:
            self._loop(vcpu)
        except BaseException as e:  # handed to run() in the main thread
            if self._error is None:
                self._error = e
            self.machine.request_stop(StopReason.ERROR, f"vcpu{vcpu.index}: {e}")

    def _loop(self, vcpu: KvmVcpu) -> None:
        """The exit loop: the hot path of the engine, kept flat on purpose
        (constants in locals, one unpack for the exit reason and the I/O fields).
        Time inside KVM_RUN is sampled: one KVM_RUN in SAMPLE_EVERY is timed
        into run_ns and the handling of its exit into handle_ns (timing every
        one cost ~4 % of the exit rate in bench/exits.py); loop_ns gets the
        whole loop, which costs() splits in the samples' proportion."""
        ns = time.perf_counter_ns
        start = ns()
        try:
            self._exit_loop(vcpu, ns)
        finally:
            self.loop_ns[vcpu.index] += ns() - start

    def _exit_loop(self, vcpu: KvmVcpu, ns) -> None:
        run_ns, handle_ns, index = self.run_ns, self.handle_ns, vcpu.index
        machine = self.machine
        mm = vcpu.run_mm
        fd = vcpu.fd
        run, RUN, get_errno = _ioctl, abi.RUN, ctypes.get_errno
        counts = self.exit_counts[vcpu.index]
        io_bus = machine.io_bus
        io_read, io_write = io_bus.read, io_bus.write
        mmio_read, mmio_write = machine.mmio_bus.read, machine.mmio_bus.write
        unpack_exit = abi.IO_EXIT_WITH_REASON.unpack_from
        unpack_mmio = abi.MMIO_EXIT.unpack_from
        EXIT_IO, EXIT_MMIO, IO_OUT, UNION = abi.EXIT_IO, abi.EXIT_MMIO, abi.IO_OUT, abi.RUN_UNION
        from_bytes = int.from_bytes
        every = SAMPLE_EVERY
        countdown = every
        gate, stopping = self.gate, self._stopping
        gate.park(stopping)          # paused before this thread first ran
        handled_from = 0             # end of a timed KVM_RUN whose exit is being handled
        while machine.stop_status is None:
            if handled_from:
                handle_ns[index] += ns() - handled_from
                handled_from = 0
            countdown -= 1
            if countdown:
                r = run(fd, RUN, None)
            else:
                countdown = every
                t0 = ns()
                r = run(fd, RUN, None)
                handled_from = ns()
                run_ns[index] += handled_from - t0
            if r < 0:
                handled_from = 0     # a kick, maybe a pause next: not exit handling
                err = get_errno()
                if err in (errno.EINTR, errno.EAGAIN):
                    mm[abi.RUN_IMMEDIATE_EXIT] = 0
                    if gate.closed:
                        gate.park(stopping)
                    if self.on_kick is not None:
                        self.on_kick(vcpu)
                    continue
                raise EngineError(f"KVM_RUN on vcpu{vcpu.index}: {errno.errorcode.get(err, err)}")
            reason, direction, size, port, count, off = unpack_exit(mm, 0)
            counts[reason & 31] += 1
            if reason == EXIT_IO:
                if count == 1:
                    if direction == IO_OUT:
                        io_write(port, size, from_bytes(mm[off:off + size], "little"))
                    else:
                        mm[off:off + size] = io_read(port, size).to_bytes(size, "little")
                elif direction == IO_OUT:  # rep outs: the bus loops over the elements
                    io_bus.write_many(port, size, mm[off:off + size * count])
                else:
                    mm[off:off + size * count] = io_bus.read_many(port, size, count)
            elif reason == EXIT_MMIO:
                addr, data, length, is_write = unpack_mmio(mm, UNION)
                if is_write:
                    mmio_write(addr, length, from_bytes(data[:length], "little"))
                else:
                    mm[UNION + 8:UNION + 8 + length] = mmio_read(addr, length).to_bytes(length, "little")
            else:
                self._slow_exit(vcpu, reason)

    def _slow_exit(self, vcpu: KvmVcpu, reason: int) -> None:
        machine = self.machine
        mm = vcpu.run_mm
        if reason == abi.EXIT_HLT:
            # Only without the in-kernel irqchip: nothing can ever wake the vCPU.
            machine.request_stop(StopReason.HALTED, f"vcpu{vcpu.index} halted")
        elif reason == abi.EXIT_SHUTDOWN:
            machine.request_stop(StopReason.RESET, "triple fault")
        elif reason == abi.EXIT_SYSTEM_EVENT:
            kind = abi.SYSTEM_EVENT.unpack_from(mm, abi.RUN_UNION)[0]
            if kind == abi.SYSTEM_EVENT_RESET:
                machine.request_stop(StopReason.RESET, "system event: reset")
            else:
                machine.request_stop(StopReason.POWEROFF, f"system event {kind}")
        elif reason == abi.EXIT_INTR:
            pass
        elif reason in self.exit_hooks:   # e.g. user-space MSR exits (paravirt/install.py)
            self.exit_hooks[reason](vcpu)
        elif reason == abi.EXIT_INTERNAL_ERROR:
            self._complete_or_crash(vcpu)
        elif reason == abi.EXIT_FAIL_ENTRY:
            hw_reason = abi.FAIL_ENTRY.unpack_from(mm, abi.RUN_UNION)[0]
            raise GuestCrash(f"KVM could not enter the guest (hardware reason 0x{hw_reason:x}) on vcpu{vcpu.index}\n"
                             + state.describe(state.save(vcpu)))
        else:
            name = abi.EXIT_NAMES.get(reason, str(reason))
            raise GuestCrash(f"unexpected KVM exit '{name}' on vcpu{vcpu.index}\n" + state.describe(state.save(vcpu)))

    def _complete_or_crash(self, vcpu: KvmVcpu) -> None:
        """Completes an instruction KVM could not emulate, or reports the crash."""
        mm = vcpu.run_mm
        suberror, ndata = abi.INTERNAL_EXIT.unpack_from(mm, abi.RUN_UNION)
        if suberror != abi.INTERNAL_ERROR_EMULATION or not self.complete_instructions:
            raise self._crash(vcpu)
        insn = b""
        if ndata >= 2:
            _, _, flags, size, raw = abi.EMULATION_FAILURE.unpack_from(mm, abi.RUN_UNION)
            insn = raw[:size] if flags & 1 else b""
        if self.completer is None:
            from .completion import Completer
            self.completer = Completer(self)
        try:
            self.completer.complete(vcpu, insn)
        except Exception as e:  # any failure to complete is the guest's crash, reported
            log.debug("completion failed", exc_info=True)
            raise self._crash(vcpu, f"; pyvmm could not complete it either: {e}") from None

    def _crash(self, vcpu: KvmVcpu, note: str = "") -> GuestCrash:
        """Builds the report for KVM_EXIT_INTERNAL_ERROR: reason, RIP, bytes, registers."""
        mm = vcpu.run_mm
        suberror, ndata = abi.INTERNAL_EXIT.unpack_from(mm, abi.RUN_UNION)
        what = abi.INTERNAL_ERROR_SUBERRORS.get(suberror, f"suberror {suberror}")
        st = state.save(vcpu)
        insn = b""
        if suberror == abi.INTERNAL_ERROR_EMULATION and ndata >= 2:
            _, _, flags, size, raw = abi.EMULATION_FAILURE.unpack_from(mm, abi.RUN_UNION)
            if flags & 1:
                insn = raw[:size]
        if not insn:
            insn = self.read_guest_virtual(vcpu, st.cs.base + st.rip, 15)
        text = insn.hex(" ") if insn else "(unreadable)"
        self.machine.crash_state = st
        return GuestCrash(f"KVM internal error ({what}) on vcpu{vcpu.index} at RIP 0x{st.rip:x}, "
                          f"instruction bytes: {text}{note}\n" + state.describe(st))

    def read_guest_virtual(self, vcpu: KvmVcpu, addr: int, size: int) -> bytes:
        """Reads guest-virtual memory through the vCPU's page tables ("" if unmapped)."""
        out = b""
        while size > 0:
            phys = vcpu.translate(addr)
            if phys is None:
                break
            chunk = min(size, 0x1000 - (addr & 0xFFF))
            try:
                out += self.machine.memory.read(phys, chunk)
            except Exception:
                break
            addr += chunk
            size -= chunk
        return out

    def platform_devices(self) -> dict:
        if not self.machine.config.irqchip:
            return {}
        from .platform_state import KvmPlatformState
        # the in-kernel PIC, IOAPIC, PIT and APICs, as found at power-on
        return {"kvm_platform": KvmPlatformState(self)}

    # -- for installers of guest interfaces (engines/base.py; kvm/services.py)
    def add_cpuid_leaves(self, leaves, hypervisor_bit: bool = False) -> None:
        from . import services     # KVM's own table says "hypervisor" already
        services.add_cpuid_leaves(self, leaves)

    def cpuid_leaf(self, leaf: int) -> tuple[int, int, int, int]:
        from . import services
        return services.cpuid_leaf(self, leaf)

    def guest_clock_hz(self) -> tuple[int, int]:
        from . import services
        return services.clock_hz(self)

    def shadows_guest_page_tables(self) -> bool:
        from . import hostfit      # kvm_pvm, or no VT-x/AMD-V: KVM shadows the guest's tables
        return hostfit.kernel_mode_emulated()

    def attach_hypercalls(self, hv, msr: int) -> bool:
        from . import services
        services.attach_hypercalls(self, hv, msr)
        return True

    def port_caller(self, ports):
        from . import services
        return services.port_caller(self)

    def stats(self) -> dict:
        exits: dict[str, int] = {}
        for counts in self.exit_counts:
            for reason, n in enumerate(counts):
                if n:
                    name = abi.EXIT_NAMES.get(reason, str(reason))
                    exits[name] = exits.get(name, 0) + n
        return {"engine": self.name, "exits": exits, "total_exits": sum(exits.values()),
                "seconds_running": round(self.guest_time, 6), "irq_injections": self.irq_injections,
                "completions": dict(self.completer.counts) if self.completer else {}}

    def costs(self) -> Costs:
        """Exits by reason, completions, and the vCPU threads' exit loops'
        time split into inside KVM_RUN (guest) and the rest (pyvmm), summed
        over vCPUs.  The split is the sampled exits' (KVM_RUN and handling
        of the same exit), so a sample the host scheduler stretched moves the
        share a little instead of claiming more guest time than the loop
        ran: scaling the sampled KVM_RUNs alone did, on a loaded host, and
        left pyvmm's own time at 0."""
        st = self.stats()
        loop_s = sum(self.loop_ns) / 1e9
        ran, handled = sum(self.run_ns), sum(self.handle_ns)
        guest_s = loop_s * ran / (ran + handled) if ran + handled else 0.0
        return Costs(engine=self.name, exits=dict(st["exits"]), completions=dict(st["completions"]),
                     guest_s=guest_s, vmm_s=loop_s - guest_s)

    def close(self) -> None:
        if self.shadow is not None:
            self.shadow.close()
        if self.dirty_log in self.machine.memory.dirty_sources:
            self.machine.memory.dirty_sources.remove(self.dirty_log)
        for v in self.vcpus:
            try:
                v.close()
            except (OSError, BufferError):
                pass
        self.vcpus = []
        for obj in (self.vm, self.kvm):
            if obj is not None:
                obj.close()
        self.vm = self.kvm = None
