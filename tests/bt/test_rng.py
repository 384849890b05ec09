"""RDRAND and RDSEED in the translator (engines/bt/rng.py), the CPUID bits
that advertise them, and the deterministic stream under --deterministic."""

from __future__ import annotations

import os
import random
import sys

from pyvmm.engines.bt.cpuid import CpuidTable
from pyvmm.engines.bt.flags import flags_word
from pyvmm.engines.bt.rng import rdrand

sys.path.insert(0, os.path.dirname(__file__))
from harness import BtOracle, assemble  # noqa: E402

CODE = assemble("""
    mov rax, -1
    rdrand ax
    setc bl
    mov rcx, -1
    rdrand ecx
    setc bh
    rdseed rdx
    rdrand rsi
""")


def test_advertised_in_cpuid_and_hideable():
    assert CpuidTable().lookup(1, 0)[2] >> 30 & 1                 # RDRAND
    assert CpuidTable().lookup(7, 0)[1] >> 18 & 1                 # RDSEED
    assert CpuidTable().lookup(7, 0)[1] >> 1 & 1                  # TSC_ADJUST stays
    assert not CpuidTable(hide=["rdrand"]).lookup(1, 0)[2] >> 30 & 1
    assert not CpuidTable(hide=["rdseed"]).lookup(7, 0)[1] >> 18 & 1


def test_operand_sizes_and_flags():
    out = BtOracle().run(CODE, [0] * 16, 0x8D5, bytes(16))     # OF SF ZF AF PF CF set before
    rax, rcx, rdx, rbx, rsi = out.regs[0], out.regs[1], out.regs[2], out.regs[3], out.regs[6]
    assert rax >> 16 == 0xFFFFFFFFFFFF                           # a 16-bit write keeps the rest
    assert rcx >> 32 == 0                                        # a 32-bit write clears the top
    assert rbx & 0xFFFF == 0x0101                                # CF=1 after each
    assert out.rflags & 0x8D5 == 0x1                             # CF set; OF SF ZF AF PF clear
    assert len({rcx & 0xFFFF, rdx & 0xFFFF, rsi & 0xFFFF, rax & 0xFFFF}) > 1   # not a constant


class _Clock:
    deterministic = True


class _Cpu:
    def __init__(self, index: int, deterministic: bool):
        self.R = [0] * 16
        self.index = index
        self.clock = _Clock() if deterministic else None
        self.lf = None


def test_deterministic_stream_repeats_and_differs_per_vcpu():
    def draws(index: int) -> list[int]:
        c = _Cpu(index, True)
        out = []
        for _ in range(4):
            rdrand(c, 0, 8)
            out.append(c.R[0])
        return out
    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
    c = _Cpu(0, False)
    rdrand(c, 3, 4)
    assert isinstance(c.rng, random.SystemRandom) and c.R[3] < 1 << 32
    assert flags_word(*c.lf) == 0x1
