"""CPUID for the bt engine: a table of what the translator really implements.

The table advertises a GenuineIntel family-6 CPU with the base features
x86-64 Linux requires and nothing the translator lacks (no XSAVE, AVX,
PCID, x2APIC, MONITOR, ...).  Leaves 0x15/0x16 give the TSC and crystal
frequencies of the GuestClock, and 0x80000007 EDX bit 8 says the TSC is
invariant, so Linux takes the TSC frequency as given and never calibrates
it against the PIT (which fails under a slow engine).  The KVM paravirtual
leaves (0x40000000...) and the hypervisor bit are not here: kvmpv.py wraps
this table with them (unless --no-kvmclock).

`CpuidTable(cpu_index, ncpus, hide)` answers `lookup(leaf, subleaf)`.
Only the constructor raises (ConfigError for an unknown feature name)."""

from __future__ import annotations

import logging

from ...devices.platform.clock import cpuid_15, cpuid_16
from ...errors import ConfigError

log = logging.getLogger(__name__)

VENDOR = b"GenuineIntel"
MAX_BASIC = 0x16
MAX_EXTENDED = 0x80000008
SIGNATURE = 0x000306A9           # family 6, model 0x3A, stepping 9

# (leaf, register, bit) for each feature, named as in /proc/cpuinfo.
LEAF1_EDX = {"fpu": 0, "de": 2, "pse": 3, "tsc": 4, "msr": 5, "pae": 6,
             "cx8": 8, "apic": 9, "mtrr": 12, "pge": 13, "cmov": 15,
             "pat": 16, "pse36": 17, "clflush": 19, "mmx": 23, "fxsr": 24, "sse": 25,
             "sse2": 26}
LEAF1_ECX = {"pni": 0, "ssse3": 9, "cx16": 13, "sse4_1": 19, "sse4_2": 20, "movbe": 22, "popcnt": 23,
             "tsc_deadline_timer": 24, "rdrand": 30}
LEAF7_EBX = {"tsc_adjust": 1, "bmi1": 3, "bmi2": 8, "rdseed": 18, "adx": 19}
EXT1_EDX = {"syscall": 11, "nx": 20, "pdpe1gb": 26, "rdtscp": 27, "lm": 29}
EXT1_ECX = {"lahf_lm": 0, "abm": 5}

FEATURES: dict[str, tuple[int, int, int]] = {}
for _regs, _leaf, _reg in ((LEAF1_EDX, 1, 3), (LEAF1_ECX, 1, 2), (LEAF7_EBX, 7, 1),
                           (EXT1_EDX, 0x80000001, 3), (EXT1_ECX, 0x80000001, 2)):
    for _name, _bit in _regs.items():
        FEATURES[_name] = (_leaf, _reg, _bit)

BRAND = b"pyvmm bt virtual CPU @ 2.00GHz".ljust(48, b"\0")


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

    def __init__(self, cpu_index: int = 0, ncpus: int = 1, hide: list[str] | None = None):
        unknown = [h for h in hide or [] if h not in FEATURES]
        if unknown:
            raise ConfigError(f"bt: unknown CPUID feature(s) to hide: {', '.join(unknown)}")
        self.cpu_index = cpu_index
        self.ncpus = ncpus
        hidden = set(hide or [])
        regs = {(1, 3): 0, (1, 2): 0, (7, 1): 0, (0x80000001, 3): 0, (0x80000001, 2): 0}
        for name, (leaf, reg, bit) in FEATURES.items():
            if name not in hidden:
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

    def __repr__(self) -> str:
        return f"CpuidTable(cpu={self.cpu_index}, ncpus={self.ncpus})"

    def lookup(self, leaf: int, sub: int) -> tuple[int, int, int, int]:
        """(eax, ebx, ecx, edx) for a leaf. Leaves above the maximum answer
        as the highest basic leaf does, as Intel CPUs do."""
        if leaf == 7 and sub:
            return (0, 0, 0, 0)
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
