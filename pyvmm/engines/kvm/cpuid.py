"""Building the guest's CPUID table from what KVM supports.

Features can be hidden by their /proc/cpuinfo names; hiding one also hides
the features that depend on it (no AVX without XSAVE)."""

from __future__ import annotations

from ...errors import ConfigError
from . import abi

# name -> (leaf, subleaf, register, bit)
FEATURES: dict[str, tuple[int, int, str, int]] = {
    "sse3": (1, 0, "ecx", 0), "pclmulqdq": (1, 0, "ecx", 1), "monitor": (1, 0, "ecx", 3),
    "vmx": (1, 0, "ecx", 5), "ssse3": (1, 0, "ecx", 9), "fma": (1, 0, "ecx", 12),
    "cx16": (1, 0, "ecx", 13), "pcid": (1, 0, "ecx", 17), "sse4_1": (1, 0, "ecx", 19),
    "sse4_2": (1, 0, "ecx", 20), "x2apic": (1, 0, "ecx", 21), "movbe": (1, 0, "ecx", 22),
    "popcnt": (1, 0, "ecx", 23), "tsc_deadline_timer": (1, 0, "ecx", 24), "aes": (1, 0, "ecx", 25),
    "xsave": (1, 0, "ecx", 26), "osxsave": (1, 0, "ecx", 27), "avx": (1, 0, "ecx", 28),
    "f16c": (1, 0, "ecx", 29), "rdrand": (1, 0, "ecx", 30), "hypervisor": (1, 0, "ecx", 31),
    "fpu": (1, 0, "edx", 0), "vme": (1, 0, "edx", 1), "pse": (1, 0, "edx", 3),
    "tsc": (1, 0, "edx", 4), "msr": (1, 0, "edx", 5), "pae": (1, 0, "edx", 6),
    "mce": (1, 0, "edx", 7), "cx8": (1, 0, "edx", 8), "apic": (1, 0, "edx", 9),
    "sep": (1, 0, "edx", 11), "mtrr": (1, 0, "edx", 12), "pge": (1, 0, "edx", 13),
    "cmov": (1, 0, "edx", 15), "pat": (1, 0, "edx", 16), "clflush": (1, 0, "edx", 19),
    "mmx": (1, 0, "edx", 23), "fxsr": (1, 0, "edx", 24), "sse": (1, 0, "edx", 25),
    "sse2": (1, 0, "edx", 26),
    "fsgsbase": (7, 0, "ebx", 0), "bmi1": (7, 0, "ebx", 3), "hle": (7, 0, "ebx", 4),
    "avx2": (7, 0, "ebx", 5), "smep": (7, 0, "ebx", 7), "bmi2": (7, 0, "ebx", 8),
    "erms": (7, 0, "ebx", 9), "invpcid": (7, 0, "ebx", 10), "rtm": (7, 0, "ebx", 11),
    "avx512f": (7, 0, "ebx", 16), "rdseed": (7, 0, "ebx", 18), "adx": (7, 0, "ebx", 19),
    "smap": (7, 0, "ebx", 20), "clflushopt": (7, 0, "ebx", 23), "clwb": (7, 0, "ebx", 24),
    "sha_ni": (7, 0, "ebx", 29), "umip": (7, 0, "ecx", 2), "pku": (7, 0, "ecx", 3),
    "la57": (7, 0, "ecx", 16), "rdpid": (7, 0, "ecx", 22),
    "xsaveopt": (0xD, 1, "eax", 0), "xsavec": (0xD, 1, "eax", 1), "xsaves": (0xD, 1, "eax", 3),
    "lahf_lm": (0x80000001, 0, "ecx", 0), "abm": (0x80000001, 0, "ecx", 5),
    "syscall": (0x80000001, 0, "edx", 11), "nx": (0x80000001, 0, "edx", 20),
    "pdpe1gb": (0x80000001, 0, "edx", 26), "rdtscp": (0x80000001, 0, "edx", 27),
    "lm": (0x80000001, 0, "edx", 29),
}

# Hiding the key hides these too: software checks only the top feature.
DEPENDENTS: dict[str, tuple[str, ...]] = {
    "xsave": ("osxsave", "avx", "avx2", "fma", "f16c", "avx512f", "xsaveopt", "xsavec", "xsaves"),
    "avx": ("avx2", "fma", "f16c", "avx512f"),
    "sse2": ("sse3", "ssse3", "sse4_1", "sse4_2", "avx"),
    "apic": ("x2apic", "tsc_deadline_timer"),
}

HYPERVISOR_LEAF = 0x40000000


def expand_hidden(names: list[str]) -> set[str]:
    """Validates names and adds their dependents. Raises ConfigError for unknown names."""
    out: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop().strip().lower()
        if not name or name in out:
            continue
        if name not in FEATURES:
            raise ConfigError(f"unknown CPUID feature {name!r} (known: {', '.join(sorted(FEATURES))})")
        out.add(name)
        todo.extend(DEPENDENTS.get(name, ()))
    return out


def guest_cpuid(supported: list[abi.CpuidEntry2], vcpu: int, ncpus: int,
                hidden: set[str]) -> list[abi.CpuidEntry2]:
    """The CPUID table for one vCPU: KVM's supported set, with this vCPU's APIC
    id, the CPU count, and the hidden features cleared."""
    out = []
    for src in supported:
        e = abi.CpuidEntry2.from_buffer_copy(src)
        if e.function == 1:
            # APIC id in EBX[31:24], logical processor count in EBX[23:16], HTT.
            e.ebx = (e.ebx & 0x0000FFFF) | (vcpu << 24) | (min(ncpus, 255) << 16)
            e.edx |= 1 << 28 if ncpus > 1 else 0
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu  # x2APIC id
        for name in hidden:
            leaf, sub, reg, bit = FEATURES[name]
            if e.function == leaf and e.index == sub:
                setattr(e, reg, getattr(e, reg) & ~(1 << bit))
        out.append(e)
    return out
