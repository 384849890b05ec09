"""CPUID for the bt engine: a table of what the translator really implements.

The table advertises a GenuineIntel family-6 CPU with the base features
x86-64 Linux requires, the instruction-set features of its `--cpu-model`
(cpumodel.py: an x86-64 level or the host's, never one the translator
lacks), and no PCID, x2APIC, MONITOR, ....  With XSAVE, leaf 0xD
describes the x87, SSE and (with AVX) AVX state components.  CPUID.1:
ECX.OSXSAVE and the XSAVE area size for the current XCR0 (0xD.0:EBX)
follow the vCPU's state: system.py's `live_bits()` adds them at execution time.  Leaves 0x15/0x16 give the TSC and crystal
frequencies of the GuestClock, and 0x80000007 EDX bit 8 says the TSC is
invariant, so Linux takes the TSC frequency as given and never calibrates
it against the PIT (which fails under a slow engine).  The KVM paravirtual
leaves (0x40000000...) and the hypervisor bit are not here: kvmpv.py wraps
this table with them (unless --no-kvmclock).

`CpuidTable(cpu_index, ncpus, hide, model)` answers `lookup(leaf, subleaf)`.
Only the constructor raises (ConfigError for an unknown feature name or model)."""

from __future__ import annotations

import logging

from ...devices.platform.clock import cpuid_15, cpuid_16
from ...errors import ConfigError
from . import cpumodel

log = logging.getLogger(__name__)

from .cpuidbits import (  # noqa: F401  (FEATURES, VENDOR, BRAND: re-exported for callers)
    BRAND, EXT1_ECX, EXT1_EDX, FEATURES, LEAF1_ECX, LEAF1_EDX, LEAF7_EBX, MAX_BASIC, MAX_EXTENDED,
    SIGNATURE, VENDOR, XGETBV1, XSAVEC, XSAVEOPT)
from .hostcpu import host_cpuid
from .xstate import AVX, AVX_OFF, AVX_SIZE, area_size



def _vendor_words() -> tuple[int, int, int]:
    w = [int.from_bytes(VENDOR[i:i + 4], "little") for i in (0, 4, 8)]
    return w[0], w[2], w[1]   # ebx, ecx, edx order is "Genu" "ntel" "ineI"


def _bits(names) -> int:
    v = 0
    for b in names:
        v |= 1 << b
    return v


class CpuidTable:
    """The CPUID answers of one vCPU (APIC id = its index)."""

    def __init__(self, cpu_index: int = 0, ncpus: int = 1, hide: list[str] | None = None,
                 model: str = "v3"):
        unknown = [h for h in hide or [] if h not in FEATURES]
        if unknown:
            raise ConfigError(f"bt: unknown CPUID feature(s) to hide: {', '.join(unknown)}")
        self.cpu_index = cpu_index
        self.ncpus = ncpus
        self.model = model
        hidden = set(hide or [])
        offered = cpumodel.advertised(model)
        if "xsave" in hidden:          # AVX state needs XSAVE (as KVM's hiding does)
            hidden |= {"avx", "avx2", "fma", "f16c"}
        if "avx" in hidden:
            hidden |= {"avx2", "fma", "f16c"}
        self.features = {name for name in FEATURES if name not in hidden
                         and (name in offered or not cpumodel.is_instruction_feature(name))}
        regs = {(1, 3): 0, (1, 2): 0, (7, 1): 0, (0x80000001, 3): 0, (0x80000001, 2): 0}
        for name, (leaf, reg, bit) in FEATURES.items():
            if name in self.features:
                regs[(leaf, reg)] |= 1 << bit
        if ncpus > 1:
            regs[(1, 3)] |= 1 << 28                       # HTT: several logical CPUs
        ebx, ecx, edx = _vendor_words()
        leaf1_ebx = (cpu_index << 24) | (max(ncpus, 1) << 16) | (8 << 8)  # clflush 64 bytes
        self.leaves: dict[tuple[int, int], tuple[int, int, int, int]] = {
            (0, 0): (MAX_BASIC, ebx, ecx, edx),
            (1, 0): (SIGNATURE, leaf1_ebx, regs[(1, 2)], regs[(1, 3)]),
            (6, 0): (0x4, 0, 0, 0),                        # ARAT: the APIC timer keeps running
            # Leaf 7: TSC_ADJUST (MSR 0x3B) and RDSEED. With constant + nonstop
            # TSC and TSC_ADJUST, Linux turns off the clocksource watchdog that
            # would otherwise mark the TSC unstable against ticks a slow engine loses.
            (7, 0): (0, regs[(7, 1)], 0, 0),
            (0xB, 0): (0, 1, 0x100, cpu_index),            # SMT level: one thread per core
            # Core level: EAX = bits of the APIC id below the package id.  All
            # vCPUs share package 0, so Linux finds a sibling for each AP and
            # copies the BSP's loops_per_jiffy instead of calibrating against
            # jiffies (calibrate_delay_is_known).
            (0xB, 1): ((max(ncpus, 1) - 1).bit_length(), ncpus, 0x201, cpu_index),
            (0x15, 0): cpuid_15(),
            (0x16, 0): cpuid_16(),
            (0x80000000, 0): (MAX_EXTENDED, 0, 0, 0),
            (0x80000001, 0): (0, 0, regs[(0x80000001, 2)], regs[(0x80000001, 3)]),
            (0x80000007, 0): (0, 0, 0, 1 << 8),            # invariant TSC
            (0x80000008, 0): (0x3028, 0, 0, 0),            # 40-bit physical, 48-bit virtual
        }
        if "xsave" in self.features:
            self._xsave_leaves(model)
        for i in range(3):
            words = [int.from_bytes(BRAND[16 * i + 4 * j:16 * i + 4 * j + 4], "little") for j in range(4)]
            self.leaves[(0x80000002 + i, 0)] = tuple(words)  # type: ignore[assignment]
        # Leaf 4: cache descriptors (Linux reads them for cache sizes and cores per package).
        cores = (max(ncpus, 1) - 1) << 26
        self.leaves[(4, 0)] = (0x121 | cores, 0x01C0003F, 0x3F, 0)       # L1d 32K
        self.leaves[(4, 1)] = (0x122 | cores, 0x01C0003F, 0x3F, 0)       # L1i 32K
        self.leaves[(4, 2)] = (0x143 | cores, 0x01C0003F, 0x1FF, 0)      # L2 256K
        self.leaves[(4, 3)] = (0x163 | cores | ((ncpus - 1) << 14), 0x03C0003F, 0xFFF, 6)  # L3 4M
        self.leaves[(4, 4)] = (0, 0, 0, 0)

    def _xsave_leaves(self, model: str) -> None:
        """Leaf 0xD: the state components XCR0 may enable and their layout."""
        xcr0 = 3 | (AVX if "avx" in self.features else 0)
        self.leaves[(0xD, 0)] = (xcr0, area_size(1), area_size(xcr0), 0)
        sub1 = XSAVEOPT | XSAVEC | XGETBV1
        if model == "host":
            sub1 &= host_cpuid(0xD, 1)[0]
        self.leaves[(0xD, 1)] = (sub1, area_size(1), 0, 0)
        if xcr0 & AVX:
            self.leaves[(0xD, 2)] = (AVX_SIZE, AVX_OFF, 0, 0)

    def __repr__(self) -> str:
        return f"CpuidTable(cpu={self.cpu_index}, ncpus={self.ncpus}, model={self.model})"

    def lookup(self, leaf: int, sub: int) -> tuple[int, int, int, int]:
        """(eax, ebx, ecx, edx) for a leaf. Leaves above the maximum answer
        as the highest basic leaf does, as Intel CPUs do."""
        if leaf == 7 and sub:
            return (0, 0, 0, 0)
        if leaf == 0xD:
            return self.leaves.get((0xD, sub), (0, 0, 0, 0))
        if leaf in (4, 0xB):
            key = (leaf, sub)
            if key in self.leaves:
                return self.leaves[key]
            return (0, 0, sub & 0xFF, self.cpu_index) if leaf == 0xB else (0, 0, 0, 0)
        if (leaf, 0) in self.leaves:
            return self.leaves[(leaf, 0)]
        if 0x80000000 <= leaf <= MAX_EXTENDED or 0x40000000 <= leaf < 0x50000000:
            return (0, 0, 0, 0)
        if leaf <= MAX_BASIC:
            return (0, 0, 0, 0)
        return self.leaves[(MAX_BASIC, 0)]


HYPERVISOR_BIT = 1 << 31        # CPUID.1:ECX: running under a hypervisor


class CpuidOverlay:
    """A CpuidTable with extra leaves in front (same lookup()): the
    hypervisor interfaces (pyvmm's, KVM's, VMware's) each add one, stacked.
    With hypervisor_bit, leaf 1 also says "running under a hypervisor"."""

    def __init__(self, inner, leaves: dict[int, tuple[int, int, int, int]], hypervisor_bit: bool = False):
        self.inner = inner
        self.leaves = leaves
        self.hypervisor_bit = hypervisor_bit

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def lookup(self, leaf: int, sub: int) -> tuple[int, int, int, int]:
        got = self.leaves.get(leaf)
        if got is not None:
            return got
        a, b, c, d = self.inner.lookup(leaf, sub)
        if leaf == 1 and self.hypervisor_bit:
            c |= HYPERVISOR_BIT
        return a, b, c, d

    def __getattr__(self, name):
        return getattr(self.inner, name)
