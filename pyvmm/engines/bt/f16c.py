"""F16C: VCVTPH2PS (half to single, exact) and VCVTPS2PH (single to half,
rounded per imm8[1:0], or per MXCSR.RC when imm8[2] is set), VEX.128 and
VEX.256.  NaNs keep their sign and leading payload and come back quiet
(IE for a signalling one); MXCSR flags as in fpround, and an unmasked
one raises #XM (#UD without CR4.OSXMMEXCPT) with the destination unchanged.

Generated code raises GuestFault as described in vex.py."""

from __future__ import annotations

import iced_x86 as X

from . import fpround as R
from .gen import Gen
from .vex import check_avx, unmasked_fault, vread, vreg, vwrite

M = X.Mnemonic
MXCSR_DAZ = 0x40


def ph2ps(v: int, n: int, mx: int) -> tuple[int, int]:
    out, flags = 0, 0
    for i in range(n):
        h = v >> (16 * i) & 0xFFFF
        cls, sign, mant, exp = R.decode(h, 2)
        if cls in (R.QNAN, R.SNAN):
            if cls == R.SNAN:
                flags |= R.IE
            r = sign << 31 | 0x7FC00000 | (mant & 0x3FF) << 13
        elif cls == R.INF:
            r = R.infinity(sign, 4)
        elif cls == R.ZERO:
            r = sign << 31
        else:
            r, _ = R.round_pack(sign, mant, exp, 4, 0)
        out |= r << (32 * i)
    return out, flags


def ps2ph(v: int, n: int, imm: int, mx: int) -> tuple[int, int]:
    rc = mx >> 13 & 3 if imm & 4 else imm & 3
    out, flags = 0, 0
    for i in range(n):
        s = v >> (32 * i) & 0xFFFFFFFF
        cls, sign, mant, exp = R.decode(s, 4)
        if cls == R.DENORMAL and mx & MXCSR_DAZ:
            cls = R.ZERO
        if cls in (R.QNAN, R.SNAN):
            if cls == R.SNAN:
                flags |= R.IE
            r = sign << 15 | 0x7E00 | (mant >> 13 & 0x1FF)
        elif cls == R.INF:
            r = R.infinity(sign, 2)
        elif cls == R.ZERO:
            r = sign << 15
        else:
            if cls == R.DENORMAL:
                flags |= R.DE
            r, f = R.round_pack(sign, mant, exp, 2, rc)
            flags |= f
        out |= r << (16 * i)
    return out, flags


EXPORTS = {"F16C_PH2PS": ph2ps, "F16C_PS2PH": ps2ph}


def _ph2ps(g: Gen) -> None:
    check_avx(g)
    n = vreg(g, 0)[1] // 4
    src = vread(g, 1, 2 * n)
    g.emit(f"_r, _f = F16C_PH2PS({src}, {n}, c.mxcsr)")
    unmasked_fault(g)
    vwrite(g, 0, "_r")


def _ps2ph(g: Gen) -> None:
    check_avx(g)
    n = vreg(g, 1)[1] // 4
    imm = g.ins.immediate(2) & 0xFF
    g.emit(f"_r, _f = F16C_PS2PH({vread(g, 1)}, {n}, {imm}, c.mxcsr)")
    g.emit(f"if _f & ~(c.mxcsr >> 7): SIMD_FAULT(c, _f)")
    vwrite(g, 0, "_r", 2 * n)
    g.emit("c.mxcsr |= _f")    # after the store, which may fault


EMITTERS = {M.VCVTPH2PS: _ph2ps, M.VCVTPS2PH: _ps2ph}
