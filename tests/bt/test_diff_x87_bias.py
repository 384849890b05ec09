"""x87 results under an unmasked overflow or underflow, against the real
CPU (KvmOracle: CPL3 under KVM runs natively).

With OM or UM clear, an arithmetic result bound for a register is
rounded with an unbounded exponent and then rebiased by 2^-24576 (overflow)
or 2^+24576 (underflow) so the handler sees its significand (SDM Vol. 1,
8.5.4 and 8.5.5); a store to a binary32/binary64 memory operand writes
nothing and leaves ST(0) alone.  Random operands near both ends of the
exponent range, under random FCW.PC, FCW.RC and OM/UM/PM masks, through
FADD, FSUB, FMUL, FDIV, FSCALE and FST m32/m64.  Compared: the status
word (FNSTSW AX, before FNCLEX), both stack registers as FSTP m80 writes
them, and the memory operand."""

from __future__ import annotations

import os
import random
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

EXAMPLES = int(os.environ.get("PYVMM_BT_X87_BIAS_EXAMPLES", "600"))
CW_AT, A_AT, B_AT, OUT_AT, MEM_AT = 0x3F0, 0x110, 0x100, 0x200, 0x240
OPS = ["fmul st, st(1)", "fdiv st, st(1)", "fadd st, st(1)", "fsub st, st(1)", "fscale", "fstp dword ptr [rbp + 0x240]",
       "fst dword ptr [rbp + 0x240]", "fst qword ptr [rbp + 0x240]", "fmul st, st(0)"]


def _operand(rng, op: str) -> int:
    if op == "fscale" and rng.random() < 0.5:     # ST(1) is the scale: a large integer of either sign
        n = rng.randrange(1, 40000)
        e = n.bit_length() - 1
        return rng.getrandbits(1) << 79 | (16383 + e) << 64 | n << (63 - e)
    k = rng.random()
    if k < 0.4:
        exp = rng.randrange(1, 400)
    elif k < 0.8:
        exp = rng.randrange(0x7FFE - 400, 0x7FFF)
    elif k < 0.9:
        exp = rng.randrange(16383 - 200, 16383 + 200)
    else:                                        # near binary32/binary64's ends, for the stores
        exp = 16383 + rng.choice([rng.randrange(-1100, -1000), rng.randrange(1000, 1100),
                                  rng.randrange(-160, -120), rng.randrange(120, 135)])
    return rng.getrandbits(1) << 79 | exp << 64 | 1 << 63 | rng.getrandbits(63)


def _cw(rng) -> int:
    cw = 0x1040 | 0x1 | 0x2 | 0x4                  # IM, DM, ZM masked
    cw |= rng.choice([0, 2, 3]) << 8 | rng.randrange(4) << 10
    for bit in (0x8, 0x10, 0x20):                  # OM, UM, PM
        if rng.random() < 0.5:
            cw |= bit
    return cw


def test_unmasked_overflow_and_underflow_results_match_the_cpu():
    kvm, bt = KvmOracle(), harness.BtOracle()
    bt.state.cr0 |= 0x20
    bt.state.cr4 |= 1 << 9 | 1 << 10
    rng = random.Random(2414)
    texts, ops = [], []
    for _ in range(EXAMPLES):
        op = rng.choice(OPS)
        ops.append(op)
        texts.append(f"fninit\nfldcw [rbp + {CW_AT}]\nfld tbyte ptr [rbp + {B_AT}]\nfld tbyte ptr [rbp + {A_AT}]\n"
                     f"{op}\nfnstsw ax\nfnclex\nfstp tbyte ptr [rbp + {OUT_AT}]\n"
                     f"fstp tbyte ptr [rbp + {OUT_AT + 16}]\nfninit")
    bad, adjusted = [], 0
    try:
        for op, text, code in zip(ops, texts, harness.assemble_many(texts)):
            page = bytearray(harness.DATA_SIZE)
            page[CW_AT:CW_AT + 2] = _cw(rng).to_bytes(2, "little")
            page[A_AT:A_AT + 10] = _operand(rng, op).to_bytes(10, "little")
            page[B_AT:B_AT + 10] = _operand(rng, op).to_bytes(10, "little")
            page[MEM_AT:MEM_AT + 8] = bytes([0xA5]) * 8
            regs = [0] * 16
            regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
            want = kvm.run(code, regs, 2, bytes(page))
            got = bt.run(code, regs, 2, bytes(page))
            cw = int.from_bytes(page[CW_AT:CW_AT + 2], "little")
            adjusted += bool(want.regs[0] & ~cw & 0x18)          # an unmasked OE/UE was raised
            w = (want.vector, want.regs[0] & 0xFFFF, want.data[OUT_AT:OUT_AT + 26], want.data[MEM_AT:MEM_AT + 8])
            g = (got.vector, got.regs[0] & 0xFFFF, got.data[OUT_AT:OUT_AT + 26], got.data[MEM_AT:MEM_AT + 8])
            if w != g:
                a, b = page[A_AT:A_AT + 10][::-1].hex(), page[B_AT:B_AT + 10][::-1].hex()
                bad.append(f"{op} cw={cw:#x} a={a} b={b}: bt sw={g[1]:#06x} st0={g[2][9::-1].hex()} "
                           f"st1={g[2][25:15:-1].hex()} mem={g[3].hex()}; cpu sw={w[1]:#06x} "
                           f"st0={w[2][9::-1].hex()} st1={w[2][25:15:-1].hex()} mem={w[3].hex()}")
    finally:
        kvm.close()
    assert adjusted >= 50                   # the CPU really took many unmasked OE/UE
    assert not bad, f"{len(bad)} of {EXAMPLES} differ:\n" + "\n".join(bad[:15])
