"""KVM's paravirtual interface under the bt engine (pyvmm/engines/bt/kvmpv.py):
the CPUID signature next to pyvmm's own, kvmclock records that agree with
the bt TSC, the wall clock, steal time, PV EOI in the local APIC, the MSRs
a real KVM answers with #GP, and the --no-kvmclock switch.

Guests are small assembled programs run with deterministic time
(tests/bt/test_system.py's `run`); the stock-kernel check (the kvm-clock
line in dmesg) is part of tests/test_linux_bt.py's boot."""

from __future__ import annotations

import struct
import types

import pytest

from pyvmm.config import VmConfig
from pyvmm.devices.platform.clock import GuestClock
from pyvmm.devices.platform.lapic import LocalApic
from pyvmm.engines.bt import kvmpv
from pyvmm.engines.bt.faults import GuestFault
from pyvmm.engines.bt.system import rdmsr, tsc, wrmsr
from pyvmm.memory import GuestMemory
from pyvmm.paravirt import abi

from .hostfacts import from_setup
from .modeguests import PIT_10MS, PIT_VIA_APIC, WAIT3

needs_as = from_setup(programs=["as"], package="binutils")

PVTI_GPA, WALL_GPA, STEAL_GPA, EOI_GPA, OUT_GPA = 0x150000, 0x150040, 0x150080, 0x1500C0, 0x150100


def _machine(**kw):
    from tests.bt.test_guests import make_machine
    return make_machine(VmConfig(engine="bt", mem_mib=16, deterministic=True, **kw))


def _cpu(features: int = kvmpv.FEATURES, wall_ns=lambda: 5_000_000_000_123):
    """A stand-in vCPU: memory, deterministic clock, TSC offset, no APIC."""
    c = types.SimpleNamespace(memory=GuestMemory(1 << 21), clock=GuestClock("deterministic"),
                              tsc_offset=0, lapic=None, index=0)
    c.kvm_pv = kvmpv.KvmPv(c, features, wall_ns)
    return c


# --- CPUID -------------------------------------------------------------------------


def test_signature_features_and_hypervisor_bit_next_to_pyvmms_leaves():
    from pyvmm.paravirt.install import attach
    m, eng, _ = _machine()
    attach(m)                                   # pyvmm's leaves wrap the KVM table
    c = eng.cpus[0]
    a, b, cc, d = c.cpuid.lookup(0x40000000, 0)
    assert a == 0x40000001
    assert struct.pack("<III", b, cc, d) == b"KVMKVMKVM\0\0\0"
    feats = c.cpuid.lookup(0x40000001, 0)[0]
    for bit in (0, 1, 3, 5, 6, 24):             # clocksource(2), nop io delay, steal, PV EOI, stable
        assert feats >> bit & 1, bit
    assert not feats & (1 << 9 | 1 << 4 | 1 << 12)   # no PV TLB flush, async PF, poll control
    assert c.cpuid.lookup(1, 0)[2] >> 31 == 1   # hypervisor present
    a, b, cc, d = c.cpuid.lookup(abi.CPUID_BASE, 0)
    assert struct.pack("<III", b, cc, d) == abi.SIGNATURE
    assert c.cpuid.lookup(7, 0) == c.cpuid.inner.inner.lookup(7, 0)


def test_no_kvmclock_hides_everything():
    from pyvmm.cli.main import build_parser, config_from_args
    m, eng, _ = _machine(kvmclock=False)
    c = eng.cpus[0]
    assert c.cpuid.lookup(0x40000000, 0) == (0, 0, 0, 0)
    assert not c.cpuid.lookup(1, 0)[2] >> 31
    with pytest.raises(GuestFault):
        rdmsr(c, kvmpv.MSR_SYSTEM_TIME)
    args = build_parser().parse_args(["run", "--engine", "bt", "--no-kvmclock", "-kernel", __file__,
                                      "-initrd", __file__])
    assert config_from_args(args).kvmclock is False


def test_each_vcpu_has_its_own_record_through_rdmsr_wrmsr():
    m, eng, _ = _machine(cpus=2)
    c0, c1 = eng.cpus
    eng.clock.advance_ns(777)
    wrmsr(c1, 0x10, 10 ** 9)                          # vCPU 1's TSC moved
    for c, gpa in ((c0, PVTI_GPA), (c1, PVTI_GPA + 32)):
        wrmsr(c, kvmpv.MSR_SYSTEM_TIME, gpa | 1)
        assert rdmsr(c, kvmpv.MSR_SYSTEM_TIME) == gpa | 1
    eng.clock.advance_ns(10 ** 6)
    for c, gpa in ((c0, PVTI_GPA), (c1, PVTI_GPA + 32)):
        assert kvmpv.pvclock_ns(m.memory.read(gpa, 32), tsc(c)) == eng.clock.now_ns()
    with pytest.raises(GuestFault):
        rdmsr(c0, 0x4B564D40)
    with pytest.raises(GuestFault):
        wrmsr(c0, kvmpv.MSR_STEAL_TIME, STEAL_GPA | 4)


# --- MSRs on a stand-in vCPU -----------------------------------------------------------


def test_pvclock_record_agrees_with_the_tsc():
    c = _cpu()
    c.clock.advance_ns(123_456_789)
    c.tsc_offset = 1000
    assert c.kvm_pv.write_msr(kvmpv.MSR_SYSTEM_TIME, PVTI_GPA | 1)
    rec = c.memory.read(PVTI_GPA, 32)
    version, _, stamp, system, mul, shift, flags = kvmpv.PVTI.unpack(rec)
    assert version % 2 == 0 and version > 0
    assert system == 123_456_789 and stamp == 2 * 123_456_789 + 1000
    assert (mul, shift) == (1 << 31, 0)
    assert flags & kvmpv.PVCLOCK_TSC_STABLE_BIT
    for ns in (0, 1, 999_999_937, 10 ** 13):    # later readings need no new record
        c.clock.advance_ns(ns)
        now_tsc = c.clock.tsc() + c.tsc_offset
        assert kvmpv.pvclock_ns(rec, now_tsc) == c.clock.now_ns()
    assert c.kvm_pv.read_msr(kvmpv.MSR_SYSTEM_TIME) == PVTI_GPA | 1


def test_old_msrs_wall_clock_and_steal_time():
    c = _cpu()
    c.clock.advance_ns(2_000_000_000)
    assert c.kvm_pv.write_msr(kvmpv.MSR_WALL_CLOCK, WALL_GPA)
    version, sec, nsec = kvmpv.WALL.unpack(c.memory.read(WALL_GPA, 12))
    assert version % 2 == 0 and (sec, nsec) == (4998, 123)   # wall time when kvmclock was 0
    assert c.kvm_pv.write_msr(kvmpv.MSR_SYSTEM_TIME_OLD, PVTI_GPA | 1)
    assert kvmpv.PVTI.unpack(c.memory.read(PVTI_GPA, 32))[3] == 2_000_000_000
    c.memory.write(STEAL_GPA, b"\xff" * 64)
    assert c.kvm_pv.write_msr(kvmpv.MSR_STEAL_TIME, STEAL_GPA | 1)
    assert c.memory.read(STEAL_GPA, 64) == bytes(64)           # no steal, version 0, not preempted
    assert not c.kvm_pv.write_msr(kvmpv.MSR_STEAL_TIME, STEAL_GPA | 2)   # reserved bits
    assert not c.kvm_pv.write_msr(kvmpv.MSR_PV_EOI_EN, EOI_GPA | 3)       # misaligned
    assert not c.kvm_pv.write_msr(kvmpv.MSR_SYSTEM_TIME, (1 << 21) - 16 | 1)   # not all in RAM
    assert not c.kvm_pv.write_msr(kvmpv.MSR_WALL_CLOCK, 1 << 40)


def test_absent_features_and_unknown_msrs_are_gp():
    c = _cpu(features=kvmpv.FEATURE_CLOCKSOURCE2)
    assert c.kvm_pv.read_msr(kvmpv.MSR_STEAL_TIME) is None
    assert not c.kvm_pv.write_msr(kvmpv.MSR_PV_EOI_EN, EOI_GPA | 1)
    assert not c.kvm_pv.handles(kvmpv.MSR_SYSTEM_TIME_OLD)     # old clocksource not offered
    assert c.kvm_pv.read_msr(0x4B564D40) is None
    assert c.kvm_pv.read_msr(kvmpv.MSR_POLL_CONTROL) == 1      # storage, as KVM keeps it
    assert c.kvm_pv.write_msr(kvmpv.MSR_ASYNC_PF_EN, 0)


# --- PV EOI in the local APIC -------------------------------------------------------------


def _apic():
    mem = GuestMemory(1 << 21)
    eois = []
    apic = LocalApic(0, GuestClock("deterministic"), on_eoi=eois.append, bsp=True)
    apic.write_reg(0xF0, 0x1FF)
    apic.set_pv_eoi(kvmpv.PvEoiFlag(mem, EOI_GPA))
    return apic, mem, eois


def test_pv_eoi_flag_set_on_injection_and_eoi_when_guest_clears_it():
    apic, mem, _ = _apic()
    apic.accept(0x40)
    assert apic.acknowledge() == 0x40
    assert mem.read_u32(EOI_GPA) == 1                 # guest may skip the EOI register
    apic.accept(0x30)
    mem.write_u32(EOI_GPA, 0)                         # the guest's EOI
    assert apic.has_interrupt() and apic.isr == 0 and apic.pv_eois == 1
    assert apic.acknowledge() == 0x30 and mem.read_u32(EOI_GPA) == 1
    assert apic.read_reg(0x100 + 0x10 * (0x30 // 32)) == 1 << (0x30 % 32)   # a look settles it:
    assert mem.read_u32(EOI_GPA) == 0                 # flag withdrawn, a real EOI must come
    apic.write_reg(0xB0, 0)
    assert apic.isr == 0 and apic.pv_eois == 1


def test_pv_eoi_not_offered_for_level_or_with_more_pending_and_real_eoi_still_works():
    apic, mem, eois = _apic()
    apic.accept(0x50, level=True)
    assert apic.acknowledge() == 0x50 and mem.read_u32(EOI_GPA) == 0
    apic.write_reg(0xB0, 0)
    assert eois == [0x50]
    apic.accept(0x60)
    apic.accept(0x70)
    assert apic.acknowledge() == 0x70 and mem.read_u32(EOI_GPA) == 0   # 0x60 still waiting
    apic.write_reg(0xB0, 0)
    assert apic.has_interrupt() and apic.acknowledge() == 0x60 and mem.read_u32(EOI_GPA) == 1
    apic.write_reg(0xB0, 0)                           # a guest ignoring the flag
    assert mem.read_u32(EOI_GPA) == 0 and apic.isr == 0 and apic.pv_eois == 0
    apic.set_pv_eoi(None)                             # MSR cleared: no more flags
    apic.accept(0x60)
    assert apic.acknowledge() == 0x60 and mem.read_u32(EOI_GPA) == 0


# --- assembled guests ---------------------------------------------------------------------

KVMCLOCK_GUEST = f"""
    mov ecx, 0x4b564d01; mov eax, {PVTI_GPA | 1}; xor edx, edx; wrmsr
    mov ecx, 0x4b564d00; mov eax, {WALL_GPA}; xor edx, edx; wrmsr
    mov ecx, 1000
1:  dec ecx; jnz 1b
    rdtsc; mov [{OUT_GPA}], eax; mov [{OUT_GPA + 4}], edx
    mov ecx, 0x10; mov eax, 0x12345678; mov edx, 7; wrmsr     # move the TSC
    mov ecx, 1000
1:  dec ecx; jnz 1b
    rdtsc; mov [{OUT_GPA + 8}], eax; mov [{OUT_GPA + 12}], edx
    mov ecx, 0x4b564d04; mov eax, {EOI_GPA | 2}; xor edx, edx; wrmsr    # misaligned: #GP
    hlt
.org 0x200
    mov al, 'G'; mov dx, 0x3f8; out dx, al
    hlt
"""


@needs_as
def test_guest_kvmclock_follows_the_tsc_even_after_it_moves():
    from tests.bt.test_system import run
    seen = {}
    orig = kvmpv.KvmPv.update_clock

    def spy(self):
        orig(self)
        seen["c"] = self.c
        seen[len(seen)] = self.c.memory.read(PVTI_GPA, 32)
    kvmpv.KvmPv.update_clock = spy
    try:
        out, _, _ = run(KVMCLOCK_GUEST, {13: (0x200, 0)})
    finally:
        kvmpv.KvmPv.update_clock = orig
    assert out == b"G"                                  # the misaligned PV EOI address
    c = seen["c"]
    mem = c.memory
    t1, t2 = struct.unpack("<QQ", mem.read(OUT_GPA, 16))
    first, second = seen[1], seen[2]                   # at the MSR write, after wrmsr(TSC)
    assert kvmpv.PVTI.unpack(second)[0] > kvmpv.PVTI.unpack(first)[0]
    assert mem.read(PVTI_GPA, 32) == second
    ns1 = kvmpv.pvclock_ns(first, t1)
    ns2 = kvmpv.pvclock_ns(second, t2)
    assert ns1 == (t1 - 0) // 2                          # no offset yet: TSC = 2 * ns
    assert ns2 >= ns1 and ns2 == (t2 - c.tsc_offset) // 2
    assert 0x7_12345678 <= t2 < 0x7_12345678 + 2 * 10 ** 6
    assert kvmpv.WALL.unpack(mem.read(WALL_GPA, 12))[1] > 1_600_000_000   # host time, after 2020


PV_EOI_GUEST = ("""
    mov al, 0xff; out 0x21, al; out 0xa1, al
    mov ecx, 0x4b564d04; mov eax, %d; xor edx, edx; wrmsr
""" + PIT_VIA_APIC + PIT_10MS + WAIT3 + """.org 0x100
    push rax; push rdx
    inc ebx
    btr dword ptr [%d], 0
    mov al, 'P'
    jc 2f
    mov dword ptr [rsi + 0xb0], 0
    mov al, 'E'
2:  mov dx, 0x3f8; out dx, al
    pop rdx; pop rax
    iretq
""") % (EOI_GPA | 1, EOI_GPA)


@needs_as
def test_guest_pv_eoi_timer_interrupts_skip_the_eoi_register():
    from tests.bt.test_system import run
    out, _, stats = run(PV_EOI_GUEST, {0x31: (0x100, 0)})
    assert out == b"PPPD"
    assert stats["interrupts_delivered"] == 3
    assert stats["platform"]["lapic_timer_fires"] == [0]
