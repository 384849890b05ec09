"""RDRAND and RDSEED: the CPU's random number instructions.

Linux seeds its CRNG from them at boot (random_init, with random.trust_cpu
or CONFIG_RANDOM_TRUST_CPU).  Without them a kernel whose user space asks
for random bytes early spins in its jitter-entropy loop, hashing with
BLAKE2s until enough timer ticks pass: measured under bt, 8.7% of a fitted
kernel's boot.  Values come from the host's os.urandom; under
--deterministic time from a PRNG with a fixed seed per vCPU, so a run
still repeats exactly.  Both always succeed (CF=1; OF SF ZF AF PF clear)."""

from __future__ import annotations

import random

from . import flags as F

_SEED = 0x7079766D          # "pyvm": the deterministic stream's base seed


def _source(c) -> random.Random:
    src = getattr(c, "rng", None)
    if src is None:
        clock = getattr(c, "clock", None)
        if clock is not None and getattr(clock, "deterministic", False):
            src = random.Random(_SEED + c.index)
        else:
            src = random.SystemRandom()
        c.rng = src
    return src


def rdrand(c, reg: int, size: int) -> None:
    """Writes `size` random bytes to GPR `reg` (a 16-bit write keeps the
    upper bits, a 32-bit one clears them, as a mov would)."""
    v = _source(c).getrandbits(size * 8)
    R = c.R
    R[reg] = (R[reg] & ~0xFFFF) | v if size == 2 else v
    c.lf = (F.RAW * 4, F.CF, 0, 0)
