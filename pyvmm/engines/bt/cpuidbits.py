"""What the bt virtual CPU calls itself and where each CPUID feature bit
sits: constants only, so that the translator's families (mmx.py's vendor
check, the CPUID instruction's live bits) can read them without importing
the table builder (cpuid.py), which itself depends on the translator."""

from __future__ import annotations

VENDOR = b"GenuineIntel"
MAX_BASIC = 0x16
MAX_EXTENDED = 0x80000008
SIGNATURE = 0x000306A9           # family 6, model 0x3A, stepping 9

# (leaf, register, bit) for each feature, named as in /proc/cpuinfo.
LEAF1_EDX = {"fpu": 0, "de": 2, "pse": 3, "tsc": 4, "msr": 5, "pae": 6,
             "cx8": 8, "apic": 9, "sep": 11, "mtrr": 12, "pge": 13, "cmov": 15,
             "pat": 16, "pse36": 17, "clflush": 19, "mmx": 23, "fxsr": 24, "sse": 25,
             "sse2": 26}
LEAF1_ECX = {"pni": 0, "ssse3": 9, "fma": 12, "cx16": 13, "sse4_1": 19, "sse4_2": 20, "movbe": 22,
             "popcnt": 23, "tsc_deadline_timer": 24, "xsave": 26, "avx": 28, "f16c": 29, "rdrand": 30}
LEAF7_EBX = {"tsc_adjust": 1, "bmi1": 3, "avx2": 5, "bmi2": 8, "rdseed": 18, "adx": 19}
EXT1_EDX = {"syscall": 11, "nx": 20, "pdpe1gb": 26, "rdtscp": 27, "lm": 29}
EXT1_ECX = {"lahf_lm": 0, "abm": 5}

FEATURES: dict[str, tuple[int, int, int]] = {}
for _regs, _leaf, _reg in ((LEAF1_EDX, 1, 3), (LEAF1_ECX, 1, 2), (LEAF7_EBX, 7, 1),
                           (EXT1_EDX, 0x80000001, 3), (EXT1_ECX, 0x80000001, 2)):
    for _name, _bit in _regs.items():
        FEATURES[_name] = (_leaf, _reg, _bit)

BRAND = b"pyvmm bt virtual CPU @ 2.00GHz".ljust(48, b"\0")
OSXSAVE = 1 << 27                # CPUID.1:ECX, mirrors CR4.OSXSAVE
CR4_OSXSAVE = 1 << 18
# Leaf 0xD.1:EAX: XSAVEOPT, XSAVEC, XGETBV with ECX=1 (xsave.py has all three).
XSAVEOPT, XSAVEC, XGETBV1 = 1, 2, 4
