"""The engine-neutral hypercall dispatcher.

An engine hands `Hypervisor.dispatch` a VcpuPort (register access plus the
few actions only the engine can do: load CR3, flush its TLB, note page-table
writes, halt) when the guest enters the hypercall page; the dispatcher
checks the arguments against guest RAM, does the operation and puts the
result in RAX.  Bad arguments give -errno to the guest; nothing a guest
passes raises out of dispatch()."""

from __future__ import annotations

import logging
import struct
import time
from typing import Callable, Protocol

from ..device import as_dict, as_int, as_list, as_opt_int, restore_state, saved
from ..errors import GuestMemoryError
from ..loop import EventLoop, TimerHandle
from ..memory import GuestMemory
from . import abi

log = logging.getLogger(__name__)

_PACK64 = struct.Struct("<Q").pack_into
_PACK32 = struct.Struct("<I").pack_into


class VcpuPort(Protocol):
    """What the dispatcher needs from the vCPU that made the call."""
    index: int

    def reg(self, name: str) -> int:
        """A general register by name ("rax", "rbx", "rcx", "rsi", "rdi")."""

    def set_result(self, value: int) -> None:
        """Sets RAX (64-bit value)."""

    def cpl(self) -> int:
        """The current privilege level."""

    def set_cr3(self, value: int) -> None:
        """Loads CR3 (a TLB flush, as mov to CR3)."""

    def flush_tlb(self, la: int | None) -> None:
        """Drops one linear page's translation (None: all)."""

    def tables_written(self, gpas: list[int]) -> None:
        """pyvmm wrote page-table entries at these guest-physical addresses."""

    def halt(self) -> None:
        """Sets the vCPU's interrupt flag and sleeps it until the next
        interrupt once the call returns (sti; hlt without the window)."""


class Hypervisor:
    """The hypercall dispatcher of one machine.

    console(bytes) writes to the VMM console; inject(irq) raises an ISA IRQ
    edge; stop(kind, status) ends the machine (kind SHUTDOWN_*);
    clock_ns() is the machine's time in ns.  Thread-safe (the event loop's timer and
    vCPU threads)."""

    STATE_VERSION = 1

    def __init__(self, memory: GuestMemory, console: Callable[[bytes], None],
                 inject: Callable[[int], None], stop: Callable[[int, int], None],
                 clock_ns: Callable[[], int] | None = None, engine: str = "bt",
                 loop: EventLoop | None = None):
        self.memory = memory
        self.console = console
        self.inject = inject
        self.stop = stop
        self.engine = engine
        t0 = time.monotonic_ns()
        self.clock_ns = clock_ns or (lambda: time.monotonic_ns() - t0)
        # The one-shot timer runs on the machine's event loop, and the loop's
        # lock (the machine's) guards this state against vCPU threads.
        self._own_loop = loop is None
        self.loop = loop or EventLoop(name="pv-timer")
        self.lock = self.loop.lock
        self.page_msr: dict[int, int] = {}      # vCPU -> MSR value
        self.shared: dict[int, int] = {}        # vCPU -> shared page gpa
        self.counts = [0] * abi.OP_COUNT
        # RAM at guest-physical 0 (the first region), for engines' fast paths
        # that write a page-table entry in place (bt: engines/bt/pvcall.py)
        r0 = memory.regions[0] if memory.regions and memory.regions[0].gpa == 0 else None
        self.ram0 = r0.mm if r0 is not None else None
        self.ram0_size = r0.size if r0 is not None else 0
        self.errors = 0
        self._timer: TimerHandle | None = None  # the pending one-shot timer (when: time.monotonic())
        self._timer_vcpu = 0
        self._handlers = {
            abi.OP_VERSION: self._version, abi.OP_CONSOLE_WRITE: self._console_write,
            abi.OP_SET_SHARED: self._set_shared, abi.OP_IRQ_ENABLE: self._irq_enable,
            abi.OP_MMU_UPDATE: self._mmu_update, abi.OP_SET_CR3: self._set_cr3,
            abi.OP_FLUSH_TLB: self._flush_tlb, abi.OP_TIMER_ONESHOT: self._timer_oneshot,
            abi.OP_READ_TIME: self._read_time, abi.OP_HALT: self._halt,
            abi.OP_YIELD: self._yield, abi.OP_SHUTDOWN: self._shutdown,
            abi.OP_UPDATE_VA: self._update_va,
        }

    def __repr__(self) -> str:
        return f"Hypervisor(engine={self.engine}, pages={len(self.page_msr)}, calls={sum(self.counts)})"

    # -- the hypercall page MSR -------------------------------------------------
    def write_msr(self, vcpu: int, value: int) -> bool:
        """wrmsr(MSR_HYPERCALL_PAGE): installs the page (bit 0 set) or forgets
        it (0).  False: a bad value, which the engine turns into #GP."""
        gpa = value & ~0xFFF & abi.MASK64
        if value & 0xFFE:
            return False
        if value & abi.HYPERCALL_PAGE_ENABLE:
            if not self.memory.is_ram(gpa, abi.PAGE_SIZE):
                return False
            from .hypercall_page import page_bytes
            self.memory.write(gpa, page_bytes(self.engine))
            log.debug("vcpu%d: hypercall page at %#x", vcpu, gpa)
        with self.lock:
            self.page_msr[vcpu] = value
        return True

    def read_msr(self, vcpu: int) -> int:
        return self.page_msr.get(vcpu, 0)

    # -- calls -------------------------------------------------------------------
    def dispatch(self, v: VcpuPort) -> int:
        """Runs the call in v's RAX and sets RAX to its result (returned too)."""
        op = v.reg("rax") & 0xFFFFFFFF
        if v.cpl() != 0:
            result = self.failed(v, op, abi.err(abi.EPERM))
        else:
            result = self.call(v, op, v.reg("rbx"), v.reg("rcx"), v.reg("rsi"), v.reg("rdi"))
        v.set_result(result)
        return result

    def call(self, v: VcpuPort, op: int, a0: int, a1: int, a2: int, a3: int) -> int:
        """Runs operation `op` for v (at CPL 0; the caller checked) with its
        four arguments; returns the RAX value (the caller sets it).  An
        engine with the registers at hand calls this instead of dispatch."""
        fn = self._handlers.get(op)
        if fn is None:
            return self.failed(v, op, abi.err(abi.ENOSYS))
        self.counts[op] += 1
        try:
            result = fn(v, a0, a1, a2, a3) & abi.MASK64
        except GuestMemoryError:
            result = abi.err(abi.EFAULT)
        if result >= 1 << 63:
            return self.failed(v, op, result)
        return result

    def failed(self, v: VcpuPort, op: int, result: int) -> int:
        """Counts and logs an error result; returns it."""
        self.errors += 1
        log.debug("vcpu%d: hypercall %s: error %d", v.index, abi.OP_NAMES.get(op, op), result - (1 << 64))
        return result

    def _version(self, v, *_a) -> int:
        return abi.VERSION

    def _console_write(self, v, gpa, n, *_a) -> int:
        if n > abi.CONSOLE_MAX:
            return abi.err(abi.EINVAL)
        data = self.memory.read(gpa, n)
        if data:
            self.console(data)
        return n

    def _set_shared(self, v, gpa, *_a) -> int:
        if gpa == 0:
            with self.lock:
                self.shared.pop(v.index, None)
            return 0
        if gpa & 0xFFF:
            return abi.err(abi.EINVAL)
        if not self.memory.is_ram(gpa, abi.PAGE_SIZE):
            return abi.err(abi.EFAULT)
        with self.lock:
            self.shared[v.index] = gpa
            self.memory.write_obj(gpa, abi.SharedPage(vif=1))
            self._publish_time(gpa)
        return 0

    def _irq_enable(self, v, *_a) -> int:
        gpa = self.shared.get(v.index)
        if gpa is None:
            return abi.err(abi.EINVAL)
        with self.lock:
            self.memory.write_u8(gpa + abi.SHARED_OFF_VIF, 1)
            events = self.memory.read_u32(gpa + abi.SHARED_OFF_EVENTS)
            self.memory.write_u8(gpa + abi.SHARED_OFF_PENDING, 0)
            self.memory.write_u32(gpa + abi.SHARED_OFF_EVENTS, 0)
        n = 0
        if events & abi.EVENT_TIMER:
            self.inject(abi.TIMER_IRQ)
            n += 1
        return n

    def _mmu_update(self, v, list_gpa, count, size, *_a) -> int:
        if size not in (4, 8) or count > abi.MMU_BATCH_MAX:
            return abi.err(abi.EINVAL)
        if count == 0:
            return 0
        raw = self.memory.read(list_gpa, count * 16)   # GuestMemoryError -> EFAULT
        words = struct.unpack(f"<{2 * count}Q", raw)
        ptrs = words[0::2]
        locate = self.memory.locate
        places = []
        for ptr in ptrs:   # check all before writing any: a batch is all or nothing
            if ptr % size:
                return abi.err(abi.EFAULT)
            places.append(locate(ptr, size))           # GuestMemoryError -> EFAULT
        pack, mask = (_PACK64, abi.MASK64) if size == 8 else (_PACK32, 0xFFFFFFFF)
        for (mm, off), value in zip(places, words[1::2]):
            pack(mm, off, value & mask)
        for ptr in ptrs:
            self.memory.mark_dirty(ptr, size)
        v.tables_written(list(ptrs))
        return count

    def write_pte(self, ptr: int, value: int, flags: int) -> int:
        """update_va's write: the `flags`-sized entry (UVA_PTE32: 4 bytes,
        else 8) at guest-physical `ptr` takes `value`.  Returns 0, or the
        error result (-EINVAL: unknown flags; -EFAULT: misaligned or outside
        RAM, nothing written).  Raises nothing."""
        if flags & ~abi.UVA_FLAGS:
            return abi.err(abi.EINVAL)
        size = 4 if flags & abi.UVA_PTE32 else 8
        if ptr & (size - 1):
            return abi.err(abi.EFAULT)
        try:
            mm, off = self.memory.locate(ptr, size)
        except (GuestMemoryError, ValueError, OverflowError):
            return abi.err(abi.EFAULT)
        if size == 8:
            _PACK64(mm, off, value & abi.MASK64)
        else:
            _PACK32(mm, off, value & 0xFFFFFFFF)
        self.memory.mark_dirty(ptr, size)
        return 0

    def _update_va(self, v, ptr, value, la, flags, *_a) -> int:
        """update_va (engine-neutral form; bt takes engines/bt/pvcall.py's
        fast path): one entry written, the shadow entries built from it
        dropped, and with UVA_INVLPG the translation of `la` on this vCPU."""
        r = self.write_pte(ptr, value, flags)
        if r:
            return r
        v.tables_written([ptr])
        if flags & abi.UVA_INVLPG:
            v.flush_tlb(la & abi.MASK64)
        return 0

    def _set_cr3(self, v, cr3, *_a) -> int:
        if not self.memory.is_ram(cr3 & ~0xFFF & abi.MASK64, abi.PAGE_SIZE):
            return abi.err(abi.EFAULT)
        v.set_cr3(cr3)
        return 0

    def _flush_tlb(self, v, la, *_a) -> int:
        v.flush_tlb(None if la >= abi.FLUSH_ALL else la)
        return 0

    def _timer_oneshot(self, v, deadline, *_a) -> int:
        with self.lock:
            self._disarm()
            self._timer_vcpu = v.index
            if deadline:
                self._arm(deadline)
        return 0

    def _arm(self, deadline: int) -> None:
        """Sets the one-shot timer for guest time `deadline` (lock held)."""
        # kept as a point on the host's monotonic clock: the timer is as
        # far away as the guest asked, whatever clock_ns does meanwhile
        self._timer = self.loop.call_later(max(0, deadline - self.clock_ns()) / 1e9, self._fire)
        if self._own_loop:
            self.loop.start()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        """The one-shot timer expired (on the event loop, under the lock)."""
        self._timer = None
        self.raise_event(self._timer_vcpu, abi.EVENT_TIMER)

    def _read_time(self, v, *_a) -> int:
        gpa = self.shared.get(v.index)
        if gpa is not None:
            self._publish_time(gpa)
        return self.clock_ns()

    def _halt(self, v, *_a) -> int:
        v.halt()
        return 0

    def _yield(self, v, *_a) -> int:
        return 0

    def _shutdown(self, v, kind, status, *_a) -> int:
        if kind not in (abi.SHUTDOWN_POWEROFF, abi.SHUTDOWN_RESET):
            return abi.err(abi.EINVAL)
        self.stop(kind, status & 0x7F)
        return 0

    # -- events ------------------------------------------------------------------
    def raise_event(self, vcpu: int, bits: int) -> None:
        """Delivers an event: an IRQ edge if the guest's virtual IF is set
        (or it has no shared page), else a pending mark in the shared page."""
        with self.lock:
            gpa = self.shared.get(vcpu)
            if gpa is not None:
                try:
                    if not self.memory.read_u8(gpa + abi.SHARED_OFF_VIF):
                        ev = self.memory.read_u32(gpa + abi.SHARED_OFF_EVENTS)
                        self.memory.write_u32(gpa + abi.SHARED_OFF_EVENTS, ev | bits)
                        self.memory.write_u8(gpa + abi.SHARED_OFF_PENDING, 1)
                        return
                except (GuestMemoryError, ValueError):   # memory gone (machine closed)
                    return
        self.inject(abi.TIMER_IRQ)

    def _publish_time(self, gpa: int) -> None:
        """Writes the time fields (no TSC scaling: mul 0) under the version protocol."""
        ver = self.memory.read_u32(gpa + abi.SHARED_OFF_VERSION)
        self.memory.write_u32(gpa + abi.SHARED_OFF_VERSION, (ver + 1) | 1)
        self.memory.write_u64(gpa + abi.SharedPage.system_time_ns.offset, self.clock_ns())
        self.memory.write_u32(gpa + abi.SharedPage.tsc_to_system_mul.offset, 0)
        self.memory.write_u32(gpa + abi.SHARED_OFF_VERSION, ((ver + 1) | 1) + 1)

    # -- the device contract (device.py) ----------------------------------------
    def reset(self) -> None:
        """No hypercall pages, shared pages or timer, as before the guest ran."""
        with self.lock:
            self.page_msr.clear()
            self.shared.clear()
            self.counts = [0] * abi.OP_COUNT
            self.errors = 0
            self._disarm()
            self._timer_vcpu = 0

    def save(self) -> dict:
        """The timer is kept as its deadline in guest ns (clock_ns), so it
        fires as far into guest time after restore() as it would have."""
        with self.lock:
            deadline = None
            if self._timer is not None:
                deadline = self.clock_ns() + max(0, int((self._timer.when - time.monotonic()) * 1e9))
            return saved(self, {"page_msr": {str(k): v for k, v in self.page_msr.items()},
                                "shared": {str(k): v for k, v in self.shared.items()},
                                "counts": list(self.counts), "errors": self.errors,
                                "timer_deadline_ns": deadline, "timer_vcpu": self._timer_vcpu})

    def restore(self, state: dict) -> None:
        """Guest RAM (the hypercall and shared pages) is the snapshot's to
        restore; this only reloads where they are. Raises DeviceStateError."""
        with self.lock:
            restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        page_msr = {int(k): as_int(v) for k, v in as_dict(state["page_msr"]).items()}
        shared = {int(k): as_int(v) for k, v in as_dict(state["shared"]).items()}
        counts = [as_int(n) for n in as_list(state["counts"], abi.OP_COUNT)]
        deadline = as_opt_int(state["timer_deadline_ns"])
        self._timer_vcpu = as_int(state["timer_vcpu"])
        self.errors = as_int(state["errors"])
        self.page_msr, self.shared, self.counts = page_msr, shared, counts
        self._disarm()
        if deadline is not None:
            self._arm(deadline)

    def stats(self) -> dict:
        return {"calls": {abi.OP_NAMES[i]: n for i, n in enumerate(self.counts) if n},
                "errors": self.errors}

    def close(self) -> None:
        with self.lock:
            self._disarm()
        if self._own_loop:
            self.loop.close()
