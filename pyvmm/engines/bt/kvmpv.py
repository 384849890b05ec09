"""KVM's paravirtual interface for guests of the bt engine: the signature
in CPUID 0x40000000, the feature bits in 0x40000001, and the MSRs Linux
uses once it sees them (Linux Documentation/virt/kvm/x86/cpuid.rst and
msr.rst):

  kvmclock    MSR_KVM_SYSTEM_TIME(_NEW) points at a per-vCPU
              pvclock_vcpu_time_info; MSR_KVM_WALL_CLOCK(_NEW) asks for the
              host wall-clock time at which kvmclock read 0.
  PV EOI      MSR_KVM_PV_EOI_EN points at a per-vCPU flag word; the local
              APIC sets bit 0 when it injects an edge-triggered interrupt
              with nothing else pending, and the guest clears the bit
              instead of writing the EOI register (lapic.py does the EOI
              when it next looks at its state).
  steal time  MSR_KVM_STEAL_TIME points at a kvm_steal_time record; pyvmm
              reports no steal (vCPUs of one thread never wait on a host).
  NOP_IO_DELAY  no delays needed around port I/O (nothing to implement).

Time: the bt TSC is GuestClock.tsc() + the vCPU's tsc_offset, and the
clock's TSC_HZ is exactly 2 ticks per ns, so one (tsc_timestamp,
system_time) pair with mul = 2**31, shift = 0 gives every later reading
exactly (the guest computes system_time + (tsc - tsc_timestamp) / 2).  The
record is rewritten when the guest moves its TSC (IA32_TSC, TSC_ADJUST);
nothing else ever changes the rate, so PVCLOCK_TSC_STABLE_BIT is set.
Under --deterministic the clock runs from instructions retired and the TSC
with it, so kvmclock does too.

The async-PF and poll-control MSRs are kept as storage (as KVM does
without PV-feature enforcement); pyvmm never sends an async page fault.

`attach(engine, features=FEATURES, wall_ns=time.time_ns)` installs all
this on a prepared BtEngine (BtEngine.prepare does, unless --no-kvmclock).
MSR accessors return None / False where KVM injects #GP."""

from __future__ import annotations

import logging
import struct
import time
from typing import Callable

from ...devices.platform.clock import NS_PER_S, TSC_HZ
from .cpuid import CpuidOverlay

log = logging.getLogger(__name__)

CPUID_SIGNATURE_LEAF = 0x40000000
CPUID_FEATURES_LEAF = 0x40000001
SIGNATURE = b"KVMKVMKVM\0\0\0"

# CPUID 0x40000001 EAX feature bits (cpuid.rst).
FEATURE_CLOCKSOURCE = 1 << 0
FEATURE_NOP_IO_DELAY = 1 << 1
FEATURE_CLOCKSOURCE2 = 1 << 3
FEATURE_STEAL_TIME = 1 << 5
FEATURE_PV_EOI = 1 << 6
FEATURE_CLOCKSOURCE_STABLE_BIT = 1 << 24
FEATURES = (FEATURE_CLOCKSOURCE | FEATURE_NOP_IO_DELAY | FEATURE_CLOCKSOURCE2 | FEATURE_STEAL_TIME
            | FEATURE_PV_EOI | FEATURE_CLOCKSOURCE_STABLE_BIT)

# MSRs (msr.rst).
MSR_WALL_CLOCK_OLD, MSR_SYSTEM_TIME_OLD = 0x11, 0x12
MSR_WALL_CLOCK = 0x4B564D00
MSR_SYSTEM_TIME = 0x4B564D01
MSR_ASYNC_PF_EN = 0x4B564D02
MSR_STEAL_TIME = 0x4B564D03
MSR_PV_EOI_EN = 0x4B564D04
MSR_POLL_CONTROL = 0x4B564D05
MSR_ASYNC_PF_INT = 0x4B564D06
MSR_ASYNC_PF_ACK = 0x4B564D07
KVM_MSR_FIRST, KVM_MSR_LAST = 0x4B564D00, 0x4B564DFF
MSR_ENABLED = 1

# MSRs kept as plain storage: index -> value at reset.
STORED = {MSR_ASYNC_PF_EN: 0, MSR_POLL_CONTROL: 1, MSR_ASYNC_PF_INT: 0, MSR_ASYNC_PF_ACK: 0}

# struct pvclock_vcpu_time_info: version, pad, tsc_timestamp, system_time,
# tsc_to_system_mul, tsc_shift (signed), flags, 2 pad bytes.
PVTI = struct.Struct("<IIQQIbBxx")
assert PVTI.size == 32
PVTI_VERSION = 0
PVCLOCK_TSC_STABLE_BIT = 1 << 0
# struct pvclock_wall_clock: version, sec, nsec.
WALL = struct.Struct("<III")
# struct kvm_steal_time: steal, version, flags, preempted, 3 + 44 pad bytes.
STEAL = struct.Struct("<QIIB47x")
assert STEAL.size == 64

PV_EOI_BIT = 1


def scale_for(hz: int) -> tuple[int, int]:
    """(tsc_to_system_mul, tsc_shift) turning `hz` ticks into ns:
    ns = ((ticks << shift) or (ticks >> -shift)) * mul >> 32, mul < 2**32."""
    shift = 0
    while (NS_PER_S << 32) // _scaled(hz, shift) >= 1 << 32:   # slow clock: scale ticks up
        shift += 1
    while (NS_PER_S << 32) // _scaled(hz, shift - 1) < 1 << 32 and shift > -31:
        shift -= 1                                             # fast clock: keep precision
    return (NS_PER_S << 32) // _scaled(hz, shift), shift


def _scaled(hz: int, shift: int) -> int:
    return hz << shift if shift >= 0 else max(hz >> -shift, 1)


def pvclock_ns(record: bytes, tsc: int) -> int:
    """What a guest computes from a pvclock record at TSC value `tsc`."""
    _, _, stamp, system, mul, shift, _ = PVTI.unpack(record)
    delta = (tsc - stamp) & ((1 << 64) - 1)
    delta = delta << shift if shift >= 0 else delta >> -shift
    return (system + ((delta * mul) >> 32)) & ((1 << 64) - 1)


class PvEoiFlag:
    """The guest's PV-EOI word (bit 0) at `gpa`, for the local APIC."""

    __slots__ = ("memory", "gpa")

    def __init__(self, memory, gpa: int):
        self.memory = memory
        self.gpa = gpa

    def __repr__(self) -> str:
        return f"PvEoiFlag(gpa={self.gpa:#x})"

    def set(self) -> None:
        self.memory.write_u8(self.gpa, self.memory.read_u8(self.gpa) | PV_EOI_BIT)

    def test_and_clear(self) -> bool:
        """True if the bit was still set (the guest has not done its EOI)."""
        v = self.memory.read_u8(self.gpa)
        if v & PV_EOI_BIT:
            self.memory.write_u8(self.gpa, v & ~PV_EOI_BIT)
            return True
        return False


class KvmCpuidTable(CpuidOverlay):
    """A bt CpuidTable with KVM's leaves and the hypervisor bit (same lookup())."""

    def __init__(self, inner, features: int = FEATURES):
        words = [int.from_bytes(SIGNATURE[i:i + 4], "little") for i in (0, 4, 8)]
        super().__init__(inner, {CPUID_SIGNATURE_LEAF: (CPUID_FEATURES_LEAF, *words),
                                 CPUID_FEATURES_LEAF: (features, 0, 0, 0)}, hypervisor_bit=True)


class KvmPv:
    """The KVM paravirtual MSRs of one bt vCPU `c`: it needs c.memory,
    c.clock (a GuestClock), c.tsc_offset and c.lapic (None: no PV EOI)."""

    def __init__(self, c, features: int = FEATURES, wall_ns: Callable[[], int] = time.time_ns):
        self.c = c
        self.features = features
        self.wall_ns = wall_ns
        self.msrs: dict[int, int] = {}
        self.pvti_version = 0
        self.mul, self.shift = scale_for(TSC_HZ)
        self.updates = 0             # pvclock records written

    def __repr__(self) -> str:
        return f"KvmPv(cpu={self.c.index}, msrs={ {hex(k): hex(v) for k, v in self.msrs.items()} })"

    def _has(self, bit: int) -> bool:
        return bool(self.features & bit)

    def _ram(self, gpa: int, size: int) -> bool:
        """Whether a guest structure lies in RAM (KVM #GPs otherwise)."""
        return self.c.memory.is_ram(gpa, size)

    def handles(self, index: int) -> bool:
        """Whether `index` is one of KVM's MSRs (answered here, maybe with #GP)."""
        return KVM_MSR_FIRST <= index <= KVM_MSR_LAST or (
            index in (MSR_WALL_CLOCK_OLD, MSR_SYSTEM_TIME_OLD) and self._has(FEATURE_CLOCKSOURCE))

    # --- MSR access ------------------------------------------------------------

    def read_msr(self, index: int) -> int | None:
        """The MSR's value; None where KVM raises #GP."""
        if index in (MSR_WALL_CLOCK, MSR_SYSTEM_TIME) and not self._has(FEATURE_CLOCKSOURCE2):
            return None
        if index == MSR_STEAL_TIME and not self._has(FEATURE_STEAL_TIME):
            return None
        if index == MSR_PV_EOI_EN and not self._has(FEATURE_PV_EOI):
            return None
        if index in (MSR_WALL_CLOCK, MSR_SYSTEM_TIME, MSR_WALL_CLOCK_OLD, MSR_SYSTEM_TIME_OLD,
                     MSR_STEAL_TIME, MSR_PV_EOI_EN):
            return self.msrs.get(index, 0)
        if index in STORED:
            return self.msrs.get(index, STORED[index])
        return None

    def write_msr(self, index: int, value: int) -> bool:
        """Writes a KVM MSR; False where KVM raises #GP."""
        if index in (MSR_WALL_CLOCK, MSR_WALL_CLOCK_OLD):
            if (index == MSR_WALL_CLOCK and not self._has(FEATURE_CLOCKSOURCE2)) or not self._ram(value, WALL.size):
                return False
            self.msrs[index] = value
            self._write_wall_clock(value)
            return True
        if index in (MSR_SYSTEM_TIME, MSR_SYSTEM_TIME_OLD):
            if index == MSR_SYSTEM_TIME and not self._has(FEATURE_CLOCKSOURCE2):
                return False
            if value & MSR_ENABLED and not self._ram(value & ~1, PVTI.size):
                return False
            self.msrs[index] = value
            if value & MSR_ENABLED:
                self.update_clock()
            return True
        if index == MSR_STEAL_TIME:
            if not self._has(FEATURE_STEAL_TIME) or value & 0x3E:
                return False
            if value & MSR_ENABLED and not self._ram(value & ~0x3F, STEAL.size):
                return False
            self.msrs[index] = value
            if value & MSR_ENABLED:
                self.c.memory.write(value & ~0x3F, STEAL.pack(0, 0, 0, 0))
            return True
        if index == MSR_PV_EOI_EN:
            if not self._has(FEATURE_PV_EOI) or value & 2:
                return False
            if value & MSR_ENABLED and not self._ram(value & ~3, 4):
                return False
            self.msrs[index] = value
            self._set_pv_eoi(PvEoiFlag(self.c.memory, value & ~3) if value & MSR_ENABLED else None)
            return True
        if index in STORED:
            self.msrs[index] = value
            return True
        return False

    # --- kvmclock ----------------------------------------------------------------

    def _system_time_gpa(self) -> int | None:
        for index in (MSR_SYSTEM_TIME, MSR_SYSTEM_TIME_OLD):
            v = self.msrs.get(index, 0)
            if v & MSR_ENABLED:
                return v & ~1
        return None

    def record(self) -> bytes:
        """A pvclock_vcpu_time_info for now (version left to the writer)."""
        c = self.c
        now = c.clock.now_ns()
        # The bt TSC (system.tsc) is the clock's plus the vCPU's offset.
        stamp = (now * TSC_HZ // NS_PER_S + c.tsc_offset) & ((1 << 64) - 1)
        system = now
        flags = PVCLOCK_TSC_STABLE_BIT if self._has(FEATURE_CLOCKSOURCE_STABLE_BIT) else 0
        return PVTI.pack(0, 0, stamp, system, self.mul, self.shift, flags)

    def update_clock(self) -> None:
        """Rewrites the pvclock record (odd version while it changes)."""
        gpa = self._system_time_gpa()
        if gpa is None:
            return
        mem = self.c.memory
        self.pvti_version += 1                            # odd: being updated
        mem.write_u32(gpa, self.pvti_version)
        mem.write(gpa + 8, self.record()[8:])
        self.pvti_version += 1                            # even: consistent
        mem.write_u32(gpa, self.pvti_version)
        self.updates += 1

    def tsc_changed(self) -> None:
        """The guest moved this vCPU's TSC: the record's pair must follow."""
        self.update_clock()

    def _write_wall_clock(self, gpa: int) -> None:
        c = self.c
        boot = max(self.wall_ns() - c.clock.now_ns(), 0)
        mem = c.memory
        version = mem.read_u32(gpa) | 1                   # odd: being updated
        mem.write_u32(gpa, version)
        mem.write(gpa + 4, WALL.pack(0, boot // NS_PER_S & 0xFFFFFFFF, boot % NS_PER_S)[4:])
        mem.write_u32(gpa, version + 1)

    # --- PV EOI ------------------------------------------------------------------

    def _set_pv_eoi(self, flag: PvEoiFlag | None) -> None:
        lapic = self.c.lapic
        if lapic is None:
            return
        lapic.set_pv_eoi(flag)


def attach(engine, features: int = FEATURES, wall_ns: Callable[[], int] = time.time_ns) -> None:
    """Gives every vCPU of a prepared BtEngine KVM's CPUID leaves and MSRs."""
    for c in engine.cpus:
        c.cpuid = KvmCpuidTable(c.cpuid, features)
        c.kvm_pv = KvmPv(c, features, wall_ns)
    log.debug("bt: KVM paravirtual features %#x on %d vCPUs", features, len(engine.cpus))
