"""Which instruction-set features the bt virtual CPU advertises for each
`--cpu-model`: the x86-64 micro-architecture levels of the psABI
(baseline, v2, v3) or `host`, and always only what the translator
implements (features.implemented over the emitter table), so a level
grows by itself as the translator does.

- baseline: x86-64 (x87, MMX, SSE, SSE2, CMPXCHG8B, CMOV, SYSCALL, SYSENTER, ...);
- v2: + CMPXCHG16B, LAHF/SAHF, POPCNT, SSE3, SSSE3, SSE4.1, SSE4.2;
- v3: + AVX, AVX2, BMI1, BMI2, F16C, FMA, LZCNT, MOVBE, XSAVE, and the
  extras outside the levels that bt implements (ADX, RDRAND, RDSEED, RDTSCP);
- host: every implemented feature the host CPU has (read with the real
  CPUID instruction, so on kvm_pvm too it is the CPU's own answer).

Features that name no instruction (PAE, NX, APIC, TSC deadline, ...) are
not the model's business: cpuid.py always offers them.  Raises nothing
but ConfigError (an unknown model)."""

from __future__ import annotations

import functools

from ...config import CPU_MODELS
from ...errors import ConfigError
from . import features
from .cpuidbits import FEATURES
from .hostcpu import host_cpuid

BASELINE = frozenset({"fpu", "tsc", "msr", "cx8", "cmov", "clflush", "mmx", "fxsr", "sse", "sse2", "syscall",
                      "sep"})
V2 = BASELINE | {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2"}
V3 = V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
EXTRAS = frozenset({"adx", "rdrand", "rdseed", "rdtscp"})
LEVELS = {"baseline": BASELINE, "v2": V2, "v3": V3 | EXTRAS}

def host_features() -> set[str]:
    """The cpuid.FEATURES names this host's CPU reports."""
    maxima = {0: host_cpuid(0)[0], 0x80000000: host_cpuid(0x80000000)[0]}
    have = set()
    for name, (leaf, reg, bit) in FEATURES.items():
        if leaf <= maxima[leaf & 0x80000000] and host_cpuid(leaf)[reg] >> bit & 1:
            have.add(name)
    return have


@functools.lru_cache(maxsize=1)
def implemented() -> frozenset[str]:
    """The instruction-set features the translator implements (its emitters)."""
    from .sem import EMITTERS  # late: the translator's tables are built once, on first use
    return frozenset(features.implemented(EMITTERS))


def advertised(model: str) -> frozenset[str]:
    """The instruction-set features `model` offers. Raises ConfigError."""
    if model not in CPU_MODELS:
        raise ConfigError(f"unknown cpu model {model!r} (choose from {', '.join(CPU_MODELS)})")
    if model == "host":
        return implemented() & frozenset(host_features())
    return implemented() & LEVELS[model]


def is_instruction_feature(name: str) -> bool:
    """True for a feature a model decides (it names instructions)."""
    return name in features.INSTRUCTIONS
