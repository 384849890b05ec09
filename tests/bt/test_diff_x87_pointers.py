"""FIP, FDP and FOP (the last non-control x87 instruction's address,
memory operand and opcode) as FNSTENV, FXSAVE and FXSAVE64 store them.

Against the real CPU (KvmOracle, CPL3 runs natively): x87 sequences with
and without memory operands, control instructions (which leave the
pointers alone) in between, then FNSTENV: bt's 28-byte image must equal
the CPU's, except FCS/FDS, whose values are the host's own user selectors
under kvm_pvm (bt's must be its CS and DS).  Some sequences store the
environment, FNINIT (which clears the pointers) and FLDENV it back.

FXSAVE differs by vendor: AMD stores FIP/FDP/FOP only while an exception
is pending, Intel always (SDM Vol. 1, 10.5.1).  bt presents GenuineIntel,
so its FXSAVE (32-bit: offsets with FCS/FDS; FXSAVE64: 64-bit pointers)
is held to the same values the CPU's FNSTENV gave."""

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

ENV, FX32, FX64 = 0x200, 0x400, 0x600
NON_CONTROL = ["fld1", "fldz", "fld qword ptr [rbp + {o}]", "fld dword ptr [rbp + {o}]", "fadd st, st(0)",
               "fmul qword ptr [rbp + {o}]", "fiadd dword ptr [rbp + {o}]", "fxch", "fabs", "fchs", "fnop",
               "fst qword ptr [rbp + {o}]", "fcom st(1)", "fucomi st, st(1)", "fincstp", "fdecstp",
               "ffree st(7)", "fld tbyte ptr [rbp + {o}]", "fdiv qword ptr [rbp + {o}]", "fcmove st, st(1)"]
CONTROL = ["fnstcw [rbp + 0x1F0]", "fldcw [rbp + 0x1F2]", "fnstsw ax", "fnclex", "fnstenv [rbp + 0x180]",
           "fwait"]


def sequences(n: int) -> list[str]:
    rng = random.Random(77)
    out = []
    for _ in range(n):
        body = ["fninit"]
        for _ in range(rng.randrange(1, 6)):
            pool = CONTROL if rng.random() < 0.3 else NON_CONTROL
            body.append(rng.choice(pool).format(o=8 * rng.randrange(0, 20)))
        if rng.random() < 0.3:     # FLDENV loads the pointers back (FNINIT cleared them)
            body += ["fnstenv [rbp + 0x1C0]", "fninit", "fldenv [rbp + 0x1C0]"]
        body += [f"fnstenv [rbp + {ENV}]", f"fxsave [rbp + {FX32}]", f"fxsave64 [rbp + {FX64}]", "fninit"]
        out.append("\n".join(body))
    return out


def test_fip_fdp_fop_match_the_cpu():
    kvm, bt = KvmOracle(), harness.UserBtOracle()
    bad = []
    try:
        texts = sequences(300)
        for text, code in zip(texts, harness.assemble_many(texts)):
            page = bytearray(harness.DATA_SIZE)
            for o in range(0, 0xA0, 8):
                page[o:o + 8] = struct.pack("<d", 1.5 + o)
            page[0x1F2:0x1F4] = (0x37F).to_bytes(2, "little")
            regs = [0] * 16
            regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
            want, got = kvm.run(code, regs, 2, bytes(page)), bt.run(code, regs, 2, bytes(page))
            assert want.vector is None and got.vector is None, text
            w, g = want.data[ENV:ENV + 28], got.data[ENV:ENV + 28]
            # FCS (bytes 16-17) and FDS (24-25): the host's selectors vs bt's CS and DS
            strip = lambda e: e[:16] + e[18:24] + e[26:]           # noqa: E731
            if strip(w) != strip(g):
                bad.append(f"fnstenv: bt {g.hex()} cpu {w.hex()}\n  {text!r}")
            fip, fcs_fop, fdp, fds = struct.unpack_from("<IIII", g, 12)
            cs, ds = got.cpu.seg[1].selector, got.cpu.seg[3].selector
            uses_memory = fdp != 0
            if fcs_fop & 0xFFFF not in (0, cs) or (uses_memory and fds & 0xFFFF != ds):
                bad.append(f"fnstenv selectors {fcs_fop & 0xFFFF:#x}/{fds & 0xFFFF:#x}, bt CS/DS {cs:#x}/{ds:#x}")
            fop = fcs_fop >> 16
            cpu_fip, cpu_fdp = struct.unpack_from("<I", w, 12)[0], struct.unpack_from("<I", w, 20)[0]
            fx32 = struct.unpack_from("<HIHxxIH", got.data, FX32 + 6)
            fx64 = struct.unpack_from("<HQQ", got.data, FX64 + 6)
            if fx32 != (fop, cpu_fip, fcs_fop & 0xFFFF, cpu_fdp, fds & 0xFFFF) or fx64 != (fop, cpu_fip, cpu_fdp):
                bad.append(f"fxsave {fx32} / fxsave64 {fx64}, want fop {fop:#x} fip {cpu_fip:#x} fdp {cpu_fdp:#x}"
                           f"\n  {text!r}")
    finally:
        kvm.close()
    assert not bad, f"{len(bad)} differ:\n" + "\n".join(bad[:12])


@pytest.mark.parametrize("restore, wide", [("fxrstor", False), ("fxrstor64", True)])
def test_fxrstor_loads_the_pointers(restore, wide):
    """FXRSTOR loads FOP/FIP/FDP (with FCS/FDS in its 32-bit form) from the
    image, the Intel way bt presents (AMD loads them only with an exception
    pending, so the host CPU is no reference here): the image is saved,
    given known pointers, restored after FNINIT, and FNSTENV shows them."""
    fip, fdp, fop, fcs, fds = 0x1234567, 0x89ABCDE, 0x5D9, 0x33, 0x2B
    if wide:
        patch = [f"mov rax, {fip}", "mov [rbp + 0x808], rax", f"mov rax, {fdp}", "mov [rbp + 0x810], rax"]
    else:
        patch = [f"mov dword ptr [rbp + 0x808], {fip}", f"mov word ptr [rbp + 0x80C], {fcs}",
                 f"mov dword ptr [rbp + 0x810], {fdp}", f"mov word ptr [rbp + 0x814], {fds}"]
    text = "\n".join(["fninit", "fld1", "fxsave64 [rbp + 0x800]", f"mov word ptr [rbp + 0x806], {fop}", *patch,
                      "fninit", f"{restore} [rbp + 0x800]", f"fnstenv [rbp + {ENV}]"])
    (code,) = harness.assemble_many([text])
    regs = [0] * 16
    regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
    got = harness.UserBtOracle().run(code, regs, 2, bytes(harness.DATA_SIZE))
    assert got.vector is None
    env_fip, env_fcs_fop, env_fdp, env_fds = struct.unpack_from("<IIII", got.data, ENV + 12)
    assert (env_fip, env_fdp, env_fcs_fop >> 16) == (fip, fdp, fop)
    if not wide:
        assert (env_fcs_fop & 0xFFFF, env_fds & 0xFFFF) == (fcs, fds)
