"""CPUID table and MSR helpers of the bt engine, without a guest."""

from __future__ import annotations

import pytest

from pyvmm.devices.platform.clock import GuestClock
from pyvmm.devices.platform.lapic import LocalApic
from pyvmm.engines.bt import cpumodel, features, system
from pyvmm.engines.bt.cpuid import FEATURES, CpuidTable
from pyvmm.engines.bt.sem import EMITTERS
from pyvmm.engines.bt.engine import BtCpu
from pyvmm.engines.bt.faults import GuestFault
from pyvmm.bus import Bus
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory


def regs_to_bytes(*words: int) -> bytes:
    return b"".join(w.to_bytes(4, "little") for w in words)


def test_vendor_and_tsc_frequency_leaves():
    t = CpuidTable()
    a, b, c, d = t.lookup(0, 0)
    assert a >= 0x15 and regs_to_bytes(b, d, c) == b"GenuineIntel"
    a, b, c, d = t.lookup(0x15, 0)
    assert c * b // a == 2_000_000_000
    assert t.lookup(0x16, 0)[0] == 2000
    assert t.lookup(0x80000007, 0)[3] & (1 << 8)          # invariant TSC


def _advertised(table: CpuidTable, name: str) -> bool:
    if name not in FEATURES:
        return False
    leaf, reg, bit = FEATURES[name]
    return bool(table.lookup(leaf, 0)[reg] >> bit & 1)


def test_features_match_what_the_translator_implements():
    """An instruction-set feature is advertised by the default model (v3)
    exactly when the emitter table implements its instructions
    (features.INSTRUCTIONS) and x86-64-v3 (with bt's extras) includes it:
    nothing advertised is missing, nothing implemented of v3 goes unadvertised."""
    table = CpuidTable()
    have = features.implemented(EMITTERS)
    level = cpumodel.LEVELS["v3"]
    wrong = {name: ("advertised, not implemented" if _advertised(table, name) else "implemented, not advertised")
             for name in features.INSTRUCTIONS
             if _advertised(table, name) != (name in have and name in level)}
    assert not wrong, wrong
    assert {"sse4_2", "ssse3", "bmi2", "popcnt", "xsave"} <= have     # x86-64-v2 and part of v3, at least
    _, _, ecx, edx = table.lookup(1, 0)
    for bit in (6, 9, 16):                                   # pae apic pat
        assert edx >> bit & 1, bit
    assert ecx >> 24 & 1                                     # TSC deadline
    assert ecx >> 26 & 1                                     # xsave
    for bit in (27, 21, 17):                                 # osxsave (live only) x2apic pcid
        assert not ecx >> bit & 1, bit
    _, _, ecx8, edx8 = CpuidTable().lookup(0x80000001, 0)
    assert edx8 >> 11 & 1 and edx8 >> 20 & 1 and edx8 >> 29 & 1   # syscall nx lm
    assert CpuidTable().lookup(0x40000000, 0) == (0, 0, 0, 0)       # no KVM paravirt leaves


def test_apic_ids_per_vcpu_and_hiding():
    assert CpuidTable(1, 2).lookup(1, 0)[1] >> 24 == 1
    assert CpuidTable(1, 2).lookup(0xB, 0)[3] == 1
    # every vCPU in package 0: APIC id >> (core-level shift) == 0
    for n in (1, 2, 3, 4, 8):
        for i in range(n):
            assert i >> CpuidTable(i, n).lookup(0xB, 1)[0] == 0
    assert not CpuidTable(hide=["nx"]).lookup(0x80000001, 0)[3] >> 20 & 1
    with pytest.raises(ConfigError):
        CpuidTable(hide=["warp-drive"])


def test_msrs():
    mem = GuestMemory(16 << 20)
    c = BtCpu(mem, Bus("io"), Bus("mmio"))
    clock = GuestClock("deterministic")
    c.clock = clock
    c.lapic = LocalApic(0, clock, bsp=True)
    assert system.rdmsr(c, 0x1B) & 0xFFFFF000 == 0xFEE00000
    system.wrmsr(c, 0xC0000082, 0xFFFFFFFF81000000)
    assert system.rdmsr(c, 0xC0000082) == 0xFFFFFFFF81000000
    assert system.rdmsr(c, 0x277) == 0x0007040600070406
    clock.advance_ns(1000)
    assert system.rdmsr(c, 0x10) == 2000
    system.wrmsr(c, 0x10, 10_000)
    assert system.rdmsr(c, 0x10) == 10_000 and system.rdmsr(c, 0x3B) == 8000
    with pytest.raises(GuestFault) as e:
        system.rdmsr(c, 0x12345)
    assert e.value.vector == 13
    with pytest.raises(GuestFault):
        system.wrmsr(c, 0xC0000082, 0x0000800000000000)      # non-canonical LSTAR
    c.detach()
