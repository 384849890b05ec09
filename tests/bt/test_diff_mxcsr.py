"""MXCSR against the real CPU (KvmOracle: CPL3 under KVM runs natively):
SSE/SSE2 ADD, SUB, MUL, DIV, SQRT, MIN and MAX (SS/SD/PS/PD), CMPcc
(predicates 0-7), (U)COMISS/SD, SSE3's ADDSUB/HADD/HSUB and the scalar
and packed conversions
with random
operands rich in denormals, NaNs (quiet and signalling), infinities, zeros
and the format's extremes, under all four rounding modes, DAZ and FTZ on
and off, and random exception masks (an unmasked exception raises #XM,
CR4.OSXMMEXCPT being set, and leaves the destination alone).  Compared:
the exception and its RIP, XMM0-7, MXCSR (flags included), the
arithmetic RFLAGS and the GPRs (conversions to integers).

PYVMM_BT_MXCSR_EXAMPLES sets the number of sequences (default 1000);
PYVMM_BT_RANDOM=1 draws new ones (a failure names the seed)."""

from __future__ import annotations

import os
import random
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
from kvm_oracle import KvmOracle, kvm_usable  # noqa: E402

_why = kvm_usable()
if _why is not None:
    pytest.skip(f"no usable /dev/kvm: {_why}", allow_module_level=True)
from tests.hostfacts import require_from_setup  # noqa: E402
require_from_setup(programs=["as"], package="binutils")
pytestmark = pytest.mark.kvm

EXAMPLES = int(os.environ.get("PYVMM_BT_MXCSR_EXAMPLES", "1000"))
SEED = random.randrange(1 << 30) if os.environ.get("PYVMM_BT_RANDOM") == "1" else 1414
XIN, MXCSR_AT = 0x200, 0x3F0
OPS = ["add", "sub", "mul", "div", "sqrt", "min", "max"]
SSE3_OPS = ["addsub", "hadd", "hsub"]
PROLOGUE = f"ldmxcsr [rbp + {MXCSR_AT}]\n" + "\n".join(f"movdqu xmm{i}, [rbp + {XIN + 16 * i}]" for i in range(8))

F32 = [0, 0x80000000, 0x3F800000, 0xBF800000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00800000,
       0x00800001, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7FA00000,
       0xFF800001, 0x3F800001, 0x40490FDB, 0x1F800000, 0x5F800000, 0x00400000, 0x3EAAAAAB]
F64 = [0, 1 << 63, 0x3FF0000000000000, 0xBFF0000000000000, 1, 0x8000000000000001, 0x000FFFFFFFFFFFFF,
       0x0010000000000000, 0x7FEFFFFFFFFFFFFF, 0xFFEFFFFFFFFFFFFF, 0x7FF0000000000000, 0xFFF0000000000000,
       0x7FF8000000000000, 0xFFF8000000000000, 0x7FF4000000000000, 0xFFF0000000000001, 0x3FF0000000000001,
       0x400921FB54442D18, 0x1FF0000000000000, 0x5FF0000000000000, 0x0008000000000000, 0x3FD5555555555555]


def _f32(rng) -> int:
    k = rng.random()
    if k < 0.5:
        return rng.choice(F32)
    if k < 0.7:     # a denormal, or a tiny/huge normal (results that under/overflow)
        return rng.getrandbits(1) << 31 | rng.choice([rng.getrandbits(23), rng.randrange(1, 24) << 23 |
                                                      rng.getrandbits(23), rng.randrange(230, 255) << 23 |
                                                      rng.getrandbits(23)])
    return rng.getrandbits(1) << 31 | rng.randrange(100, 155) << 23 | rng.getrandbits(23)


def _f64(rng) -> int:
    k = rng.random()
    if k < 0.5:
        return rng.choice(F64)
    if k < 0.7:
        return rng.getrandbits(1) << 63 | rng.choice([rng.getrandbits(52), rng.randrange(1, 60) << 52 |
                                                      rng.getrandbits(52), rng.randrange(1990, 2047) << 52 |
                                                      rng.getrandbits(52)])
    return rng.getrandbits(1) << 63 | rng.randrange(900, 1150) << 52 | rng.getrandbits(52)


def _image(rng) -> bytes:
    if rng.random() < 0.5:
        return struct.pack("<4I", *(_f32(rng) for _ in range(4)))
    return struct.pack("<2Q", *(_f64(rng) for _ in range(2)))


def _mxcsr(rng) -> int:
    if rng.random() < 0.2:          # the default with PE already set: bt's host-float fast path
        return 0x1FA0 | rng.getrandbits(6) & rng.getrandbits(6)
    v = rng.randrange(4) << 13                          # RC
    v |= 0x40 if rng.random() < 0.3 else 0              # DAZ
    v |= 0x8000 if rng.random() < 0.3 else 0            # FTZ
    v |= 0x1F80 if rng.random() < 0.75 else rng.getrandbits(6) << 7
    v |= rng.getrandbits(6) if rng.random() < 0.2 else 0   # sticky flags already set
    return v


def sequences(n: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(f"mxcsr:{seed}")
    bodies = []
    for _ in range(n):
        kind = rng.random()
        d, s = rng.randrange(8), rng.randrange(8)
        src = f"[rbp + {16 * rng.randrange(0, 0x1F0 // 16)}]" if rng.random() < 0.25 else f"xmm{s}"
        if kind < 0.62:
            ins = f"{rng.choice(OPS)}{rng.choice(['ss', 'sd', 'ps', 'pd'])} xmm{d}, {src}"
        elif kind < 0.7:
            ins = f"{rng.choice(SSE3_OPS)}{rng.choice(['ps', 'pd'])} xmm{d}, {src}"
        elif kind < 0.85:
            ins = f"cmp{rng.choice(['ss', 'sd', 'ps', 'pd'])} xmm{d}, {src}, {rng.randrange(8)}"
        elif kind < 0.92:
            ins = f"{rng.choice(['comis', 'ucomis'])}{rng.choice('sd')} xmm{d}, {src}"
        else:
            ins = rng.choice([f"cvtss2sd xmm{d}, {src}", f"cvtsd2ss xmm{d}, {src}",
                              f"cvtsi2s{rng.choice('sd')} xmm{d}, {rng.choice(['r8', 'r9d', 'r10', 'r11d'])}",
                              f"cvt{rng.choice(['', 't'])}s{rng.choice('sd')}2si {rng.choice(['r8', 'r9d'])}, xmm{s}",
                              f"cvt{rng.choice(['dq2ps', 'ps2dq', 'tps2dq', 'dq2pd', 'pd2dq', 'tpd2dq', 'ps2pd', 'pd2ps'])}"
                              f" xmm{d}, xmm{s}"])
        bodies.append(f"{PROLOGUE}\n{ins}")
    return list(zip(bodies, harness.assemble_many(bodies)))


def inputs(rng) -> tuple[list[int], int, bytes]:
    regs = [rng.getrandbits(64) for _ in range(16)]
    regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
    page = bytearray(rng.randbytes(harness.DATA_SIZE))
    for off in range(0, XIN + 0x80, 16):
        page[off:off + 16] = _image(rng)
    page[MXCSR_AT:MXCSR_AT + 4] = struct.pack("<I", _mxcsr(rng))
    return regs, 2, bytes(page)


@pytest.fixture(scope="module")
def oracles():
    kvm = KvmOracle()
    bt, bt_cold = harness.BtOracle(), harness.BtOracle(harness.COLD)
    for o in (bt, bt_cold):
        o.state.cr4 |= 1 << 9 | 1 << 10      # OSFXSR, OSXMMEXCPT, as the KVM oracle's CR4
    yield kvm, bt, bt_cold
    kvm.close()


def test_sse_arithmetic_and_mxcsr_match_the_cpu(oracles):
    kvm, bt, bt_cold = oracles
    rng = random.Random(f"in:{SEED}")
    bad, ran, faults = [], 0, 0
    for text, code in sequences(EXAMPLES, SEED):
        regs, rflags, page = inputs(rng)
        want = kvm.run(code, regs, rflags, page)
        ymm, want_mx = kvm.vector_state()
        want_x = [v & ((1 << 128) - 1) for v in ymm[:8]]
        faults += want.vector is not None
        for name, o in (("bt", bt), ("bt-cold", bt_cold)):
            got = o.run(code, regs, rflags, page)
            c = got.cpu
            d = []
            if got.vector != want.vector or (want.vector is not None and got.rip != want.rip):
                d.append(f"exception {got.vector}@{got.rip:#x}, cpu {want.vector}@{want.rip:#x}")
            if got.regs != want.regs:
                d.append("GPRs " + ", ".join(f"{harness.GPR_NAMES[i]} {g:#x} cpu {w:#x}" for i, (w, g)
                                             in enumerate(zip(want.regs, got.regs)) if w != g))
            if got.rflags & 0x8D5 != want.rflags & 0x8D5:
                d.append(f"rflags {got.rflags & 0x8D5:#x}, cpu {want.rflags & 0x8D5:#x}")
            if c.mxcsr != want_mx:
                d.append(f"mxcsr {c.mxcsr:#x}, cpu {want_mx:#x}")
            for i in range(8):
                if c.xmm[i] != want_x[i]:
                    d.append(f"xmm{i} {c.xmm[i]:032x}, cpu {want_x[i]:032x}")
            if d:
                mx = struct.unpack_from("<I", page, MXCSR_AT)[0]
                ins = text.splitlines()[-1]
                xin = [int.from_bytes(page[XIN + 16 * i:XIN + 16 * i + 16], "little") for i in range(8)]
                used = ", ".join(f"xmm{i}={xin[i]:032x}" for i in range(8) if f"xmm{i}" in ins)
                bad.append(f"{name}: {ins!r} mxcsr={mx:#x} {used}: " + "; ".join(d))
        ran += 1
    assert ran == EXAMPLES and faults > 0       # some unmasked exceptions were really taken
    assert not bad, f"{len(bad)} of {ran} sequences differ (seed {SEED}):\n" + "\n".join(bad[:20])
