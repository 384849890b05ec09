"""RCPPS/RCPSS and RSQRTPS/RSQRTSS: the approximate reciprocal and
reciprocal square root of single-precision lanes.

The SDM only bounds these: relative error at most 1.5 * 2^-12.  Intel and
AMD each answer from their own tables, so no value is "the" right one; bt
returns the exact result rounded to nearest on a 12-bit significand, which
is within 2^-13 of exact (deterministic, and inside the bound on any CPU).

What the SDM does fix, and bt follows bit for bit: MXCSR is neither read
nor written (no flags, no exceptions, no DAZ/FTZ bits consulted);
denormal inputs count as zero of the same sign, so RCP/RSQRT of them is a
signed infinity; RCP of an infinity is a signed zero; a tiny reciprocal is
flushed to a signed zero; RSQRT of a negative number is the default NaN;
NaN inputs come back quieted.

Scalar forms keep bits 127:32 of the destination; the VEX forms come
through vex.py's legacy path (VRCPSS's upper bits from VEX.vvvv)."""

from __future__ import annotations

import math
import struct

import iced_x86 as X

from .gen import Gen
from .simd import check_sse, xread, xreg

M = X.Mnemonic
_F = struct.Struct("<f")
SIGN, EXP, FRAC = 0x80000000, 0x7F800000, 0x007FFFFF
QNAN_BIT, DEFAULT_NAN, INF = 0x00400000, 0xFFC00000, 0x7F800000
MIN_NORMAL = 2.0 ** -126
SIGNIFICAND_BITS = 12


def _round12(v: float) -> float:
    """v (positive, finite) with its significand rounded to 12 bits."""
    mant, exp = math.frexp(v)                        # v = mant * 2^exp, 0.5 <= mant < 1
    return math.ldexp(round(mant * (1 << SIGNIFICAND_BITS)), exp - SIGNIFICAND_BITS)


def _pack(sign: int, v: float) -> int:
    """A positive magnitude as float32 bits with the sign: 0 when tiny.
    2^-126 itself counts as tiny: RCP(2^126) is 0 on Intel and AMD alike,
    as their tables answer slightly below 1/x."""
    if v <= MIN_NORMAL:
        return sign
    if v >= 2.0 ** 128:
        return sign | INF
    return sign | int.from_bytes(_F.pack(v), "little")


def approx_lane(x: int, rsqrt: bool) -> int:
    """One float32 lane's RCP (rsqrt False) or RSQRT result."""
    sign, exp = x & SIGN, x & EXP
    if exp == EXP:
        if x & FRAC:
            return x | QNAN_BIT                     # NaN: quieted
        if rsqrt and sign:
            return DEFAULT_NAN
        return sign                                  # 1/inf, 1/sqrt(inf): signed zero
    if exp == 0:                                     # zero or denormal: as zero
        return sign | INF
    if rsqrt and sign:
        return DEFAULT_NAN
    v = abs(_F.unpack(x.to_bytes(4, "little"))[0])
    exact = 1.0 / math.sqrt(v) if rsqrt else 1.0 / v
    return _pack(sign if not rsqrt else 0, _round12(exact))


def approx(d: int, s: int, rsqrt: bool, scalar: bool) -> int:
    """The instruction on 128-bit values: d the destination, s the source."""
    if scalar:
        return d & ~0xFFFFFFFF | approx_lane(s & 0xFFFFFFFF, rsqrt)
    out = 0
    for i in range(4):
        out |= approx_lane(s >> 32 * i & 0xFFFFFFFF, rsqrt) << 32 * i
    return out


_FORMS = {M.RCPPS: (False, False), M.RCPSS: (False, True),
          M.RSQRTPS: (True, False), M.RSQRTSS: (True, True)}


def _approx_em(g: Gen) -> None:
    check_sse(g)
    rsqrt, scalar = _FORMS[g.ins.mnemonic]
    d = xreg(g, 0)
    s = xread(g, 1, 4 if scalar else 16)
    g.emit(f"c.xmm[{d}] = SSE_APPROX(c.xmm[{d}], {s}, {rsqrt}, {scalar})")


EXPORTS = {"SSE_APPROX": approx}
EMITTERS = {m: _approx_em for m in _FORMS}
