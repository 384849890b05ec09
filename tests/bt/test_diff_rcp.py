"""RCPPS/RCPSS/RSQRTPS/RSQRTSS and their VEX forms (VEX.256 packed,
three-operand scalar) against the
real CPU (KvmOracle: CPL3 under KVM runs natively).

The SDM bounds the approximations (relative error <= 1.5 * 2^-12) and CPU
makers use different tables, so normal inputs are checked against the
bound, on bt and on the CPU alike.  What the SDM fixes is compared bit for
bit with the CPU: zeros, denormals (as zeros), infinities, NaNs, negative
RSQRT inputs, tiny results, untouched upper lanes of the scalar forms and
an untouched MXCSR."""

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

from pyvmm.engines.bt.sseapprox import approx_lane  # noqa: E402

XIN, MXCSR_AT = 0x200, 0x3F0
BOUND = 1.5 * 2.0 ** -12
SPECIAL = [0, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,
           0x7FA00000, 0xFF800001, 0x7F7FFFFF, 0xFF7FFFFF, 0x7E800000, 0x00800000, 0x80800000, 0xBF800000]
FORMS = ["rcpps", "rcpss", "rsqrtps", "rsqrtss", "vrcpps", "vrsqrtps", "vrcpss", "vrsqrtss"]


def _enable_avx(cpu) -> None:
    cpu.xcr0 = 7


def _f(bits: int) -> float:
    return struct.unpack("<f", bits.to_bytes(4, "little"))[0]


def _lane_value(rng) -> int:
    if rng.random() < 0.35:
        return rng.choice(SPECIAL)
    return rng.getrandbits(1) << 31 | rng.randrange(1, 255) << 23 | rng.getrandbits(23)


def _is_special(x: int, rsqrt: bool) -> bool:
    exp = x >> 23 & 0xFF
    return exp in (0, 0xFF) or (rsqrt and x >> 31 == 1) or (not rsqrt and exp >= 253)


def _lanes_agree(x: int, got: int, want: int, rsqrt: bool) -> str | None:
    if _is_special(x, rsqrt) or want & 0x7F800000 == 0:     # fixed by the SDM (or flushed tiny): bit-exact
        return None if got == want else f"input {x:#010x}: {got:#010x}, cpu {want:#010x}"
    exact = 1.0 / (abs(_f(x)) ** 0.5) if rsqrt else 1.0 / _f(x)
    for who, v in (("bt", got), ("cpu", want)):
        err = abs(_f(v) - exact) / abs(exact)
        if err > BOUND:
            return f"input {x:#010x}: {who} {v:#010x} off by {err:.3g}"
    return None


def test_approximations_match_the_cpu():
    kvm, bt = KvmOracle(avx_state=True), harness.BtOracle()
    bt.state.cr4 |= 1 << 9 | 1 << 10 | 1 << 18      # OSFXSR, OSXMMEXCPT, OSXSAVE
    rng = random.Random(1215)
    bodies, cases = [], []
    for _ in range(300):
        form = rng.choice(FORMS)
        d, s = rng.randrange(8), rng.randrange(8)
        ins = f"{form} xmm{d}, xmm{s}"
        if form in ("vrcpps", "vrsqrtps"):
            ins = f"{form} ymm{d}, ymm{s}"
        elif form.startswith("v"):
            ins = f"{form} xmm{d}, xmm{d}, xmm{s}"
        bodies.append(f"ldmxcsr [rbp + {MXCSR_AT}]\n" +
                      "\n".join(f"vmovdqu ymm{i}, [rbp + {XIN + 32 * i}]" for i in range(8)) + f"\n{ins}")
        cases.append((form, d, s))
    bad, compared = [], 0
    try:
        for (form, d, s), code in zip(cases, harness.assemble_many(bodies)):
            regs = [rng.getrandbits(64) for _ in range(16)]
            regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
            page = bytearray(rng.randbytes(harness.DATA_SIZE))
            for i in range(8):
                page[XIN + 32 * i:XIN + 32 * i + 32] = struct.pack("<8I", *(_lane_value(rng) for _ in range(8)))
            mx = 0x1F80 | rng.randrange(4) << 13 | rng.choice([0, 0x40, 0x8040])
            page[MXCSR_AT:MXCSR_AT + 4] = struct.pack("<I", mx)
            want = kvm.run(code, regs, 2, bytes(page))
            ymm, want_mx = kvm.vector_state()
            got = bt.run(code, regs, 2, bytes(page), setup=_enable_avx)
            c = got.cpu
            mine = [c.xmm[i] | c.ymmh[i] << 128 for i in range(8)]
            assert want.vector is None and got.vector is None, form
            rsqrt, scalar = "rsqrt" in form, form.endswith("ss")
            lanes = 1 if scalar else 8 if form in ("vrcpps", "vrsqrtps") else 4
            src = int.from_bytes(page[XIN + 32 * s:XIN + 32 * s + 32], "little")
            problems = [] if c.mxcsr == want_mx == mx else [f"mxcsr {c.mxcsr:#x}, cpu {want_mx:#x}"]
            for lane in range(lanes):
                x = src >> 32 * lane & 0xFFFFFFFF
                why = _lanes_agree(x, mine[d] >> 32 * lane & 0xFFFFFFFF, ymm[d] >> 32 * lane & 0xFFFFFFFF, rsqrt)
                compared += 1
                if why:
                    problems.append(why)
            for i in range(8):       # the bits the approximation does not write: exact
                keep = ~((1 << 32 * lanes) - 1) if i == d else -1
                if (mine[i] ^ ymm[i]) & keep & ((1 << 256) - 1):
                    problems.append(f"ymm{i} {mine[i]:064x}, cpu {ymm[i]:064x}")
            if problems:
                bad.append(f"{form} xmm{d}, xmm{s}: " + "; ".join(problems))
    finally:
        kvm.close()
    assert compared >= 300
    assert not bad, f"{len(bad)} differ:\n" + "\n".join(bad[:20])


@pytest.mark.parametrize("x, rsqrt, want", [
    (0x3F800000, False, 0x3F800000), (0x40800000, True, 0x3F000000), (0x00000001, False, 0x7F800000),
    (0x80000000, True, 0xFF800000), (0xBF800000, True, 0xFFC00000), (0xFF800000, False, 0x80000000),
    (0x7FA00000, True, 0x7FE00000), (0x7E800000, False, 0x00000000)])
def test_fixed_cases(x, rsqrt, want):
    assert approx_lane(x, rsqrt) == want
