"""SSE/SSE2 floating point: scalar and packed single/double arithmetic,
compares, conversions, movss/movsd.

Values are computed with Python floats (IEEE binary64) from the bit
patterns; binary32 results are rounded from the binary64 result, which is
exact for + - * / sqrt. NaN results follow the SSE rules (first NaN source,
quieted; the default NaN for invalid operations). Limitations: only the
ADD/SUB/MUL/DIV/SQRT/MIN/MAX, the compares (CMPcc, (U)COMIS) and the
conversions go through ssearith.py, which honours MXCSR (rounding,
DAZ/FTZ, flags, unmasked exceptions); fparith & co. here remain for the
horizontal SSE3 forms (ssse3.py), which still round to nearest without
flags.

Generated code raises GuestFault as described in simd.py."""

from __future__ import annotations

import math
import struct

import iced_x86 as X

from . import flags as F
from .gen import MASK, Gen
from .ops import sx
from .simd import check_sse, xread, xreg, xwrite
from .ssearith import sse_arith, sse_cmp, sse_comis, sse_cvt_packed, sse_f2f, sse_f2i, sse_i2f

M = X.Mnemonic
M64 = 0xFFFFFFFFFFFFFFFF
_D, _Q, _Fs, _I = struct.Struct("<d"), struct.Struct("<Q"), struct.Struct("<f"), struct.Struct("<I")
# Per width: (bits, exponent mask, quiet bit, default NaN)
_FMT = {8: (64, 0x7FF0000000000000, 1 << 51, 0xFFF8000000000000),
        4: (32, 0x7F800000, 1 << 22, 0xFFC00000)}


def _nan(b: int, w: int) -> bool:
    mant = (1 << (52 if w == 8 else 23)) - 1
    exp = _FMT[w][1]
    return (b & exp) == exp and (b & mant) != 0


def to_float(b: int, w: int) -> float:
    if w == 8:
        return _D.unpack(_Q.pack(b))[0]
    return _Fs.unpack(_I.pack(b))[0]


def from_float(x: float, w: int) -> int:
    """Bits of x rounded to width w (nearest-even; overflow gives infinity)."""
    if w == 8:
        return _Q.unpack(_D.pack(x))[0]
    try:
        return _I.unpack(_Fs.pack(x))[0]
    except OverflowError:
        return 0xFF800000 if x < 0 else 0x7F800000


def _arith(op: int, a: int, b: int, w: int) -> int:
    """One lane: op 0 add, 1 sub, 2 mul, 3 div, 4 min, 5 max, 6 sqrt(b)."""
    qbit, dnan = _FMT[w][2], _FMT[w][3]
    if op >= 4:
        if op == 6:
            if _nan(b, w):
                return b | qbit
            x = to_float(b, w)
            return dnan if x < 0 else from_float(math.sqrt(x), w)
        if _nan(a, w) or _nan(b, w):
            return b
        x, y = to_float(a, w), to_float(b, w)
        return a if (x < y if op == 4 else x > y) else b
    if _nan(a, w):
        return a | qbit
    if _nan(b, w):
        return b | qbit
    x, y = to_float(a, w), to_float(b, w)
    if op == 0:
        r = x + y
    elif op == 1:
        r = x - y
    elif op == 2:
        r = x * y
    elif y == 0.0:
        if x == 0.0:
            return dnan
        r = math.copysign(math.inf, x) * math.copysign(1.0, y)
    else:
        r = x / y
    if r != r:
        return dnan
    return from_float(r, w)


def fparith(op: int, d: int, s: int, w: int, scalar: bool) -> int:
    """A packed or scalar (low lane only) operation on 128-bit values."""
    bits = 8 * w
    m = (1 << bits) - 1
    n = 1 if scalar else 16 // w
    out = d & ~m if scalar else 0
    for i in range(n):
        sh = bits * i
        out |= _arith(op, d >> sh & m, s >> sh & m, w) << sh
    return out


def _compare(a: int, b: int, w: int, pred: int) -> bool:
    if _nan(a, w) or _nan(b, w):
        return pred in (3, 4, 5, 6)
    x, y = to_float(a, w), to_float(b, w)
    return (x == y, x < y, x <= y, False, x != y, not x < y, not x <= y, True)[pred & 7]


def fpcmp(d: int, s: int, w: int, pred: int, scalar: bool) -> int:
    bits = 8 * w
    m = (1 << bits) - 1
    n = 1 if scalar else 16 // w
    out = d & ~m if scalar else 0
    for i in range(n):
        sh = bits * i
        if _compare(d >> sh & m, s >> sh & m, w, pred):
            out |= m << sh
    return out


def comis(a: int, b: int, w: int) -> int:
    """RAW flags word of ucomis*/comis*: ZF PF CF."""
    if _nan(a, w) or _nan(b, w):
        return F.ZF | F.PF | F.CF
    x, y = to_float(a, w), to_float(b, w)
    return F.ZF if x == y else F.CF if x < y else 0


def round_int(v: int, keep: int) -> int:
    """Rounds an integer to `keep` significant bits (nearest-even), so that
    float() of the result is exact."""
    n = abs(v).bit_length() - keep
    if n <= 0:
        return v
    a = abs(v)
    q, r = a >> n, a & ((1 << n) - 1)
    half = 1 << (n - 1)
    if r > half or (r == half and q & 1):
        q += 1
    return (q << n) * (1 if v >= 0 else -1)


def int2fp(v: int, w: int) -> int:
    return from_float(float(round_int(v, 24 if w == 4 else 53)), w)


def fp2int(b: int, w: int, size: int, mode: int) -> int:
    """Float bits -> integer of `size` bytes; mode 0-3 = MXCSR.RC, 4 = truncate.
    NaN and out-of-range give the integer indefinite value."""
    indef = 1 << (8 * size - 1)
    if _nan(b, w):
        return indef
    x = to_float(b, w)
    if math.isinf(x):
        return indef
    if mode == 4 or mode == 3:
        r = math.trunc(x)
    elif mode == 0:
        r = round(x)
    elif mode == 1:
        r = math.floor(x)
    else:
        r = math.ceil(x)
    if not -indef <= r < indef:
        return indef
    return r & ((1 << (8 * size)) - 1)


def fpconv(b: int, wfrom: int, wto: int) -> int:
    """binary32 <-> binary64 conversion of one value (NaNs quieted, payload kept)."""
    if _nan(b, wfrom):
        if wfrom == 4:
            return (b >> 31) << 63 | 0x7FF8000000000000 | (b & 0x3FFFFF) << 29
        return (b >> 63) << 31 | 0x7FC00000 | (b >> 29) & 0x3FFFFF
    return from_float(to_float(b, wfrom), wto)


def cvt_packed(m: int, s: int, mxcsr: int) -> int:
    """Packed conversions by mnemonic value m."""
    rc = (mxcsr >> 13) & 3
    if m == M.CVTDQ2PS:
        return sum(int2fp(sx(s >> (32 * i) & 0xFFFFFFFF, 4), 4) << (32 * i) for i in range(4))
    if m == M.CVTDQ2PD:
        return sum(int2fp(sx(s >> (32 * i) & 0xFFFFFFFF, 4), 8) << (64 * i) for i in range(2))
    if m in (M.CVTTPS2DQ, M.CVTPS2DQ):
        mode = 4 if m == M.CVTTPS2DQ else rc
        return sum(fp2int(s >> (32 * i) & 0xFFFFFFFF, 4, 4, mode) << (32 * i) for i in range(4))
    if m in (M.CVTTPD2DQ, M.CVTPD2DQ):
        mode = 4 if m == M.CVTTPD2DQ else rc
        return sum(fp2int(s >> (64 * i) & M64, 8, 4, mode) << (32 * i) for i in range(2))
    if m == M.CVTPS2PD:
        return sum(fpconv(s >> (32 * i) & 0xFFFFFFFF, 4, 8) << (64 * i) for i in range(2))
    return sum(fpconv(s >> (64 * i) & M64, 8, 4) << (32 * i) for i in range(2))  # CVTPD2PS


EXPORTS = {"FPARITH": fparith, "FPCMP": fpcmp, "COMIS": comis, "INT2FP": int2fp,
           "FP2INT": fp2int, "FPCONV": fpconv, "CVTPACKED": cvt_packed, "SSE_ARITH": sse_arith,
           "SSE_CMP": sse_cmp, "SSE_COMIS": sse_comis, "SSE_I2F": sse_i2f, "SSE_F2I": sse_f2i,
           "SSE_F2F": sse_f2f, "SSE_CVT_PACKED": sse_cvt_packed}

# mnemonic -> (op, width, scalar)
_ARITH = {}
for _i, _op in enumerate(("ADD", "SUB", "MUL", "DIV", "MIN", "MAX", "SQRT")):
    for _suf, _w, _sc in (("SD", 8, True), ("SS", 4, True), ("PD", 8, False), ("PS", 4, False)):
        _ARITH[getattr(M, _op + _suf)] = (_i, _w, _sc)


def _arith_em(g: Gen) -> None:
    check_sse(g)
    op, w, scalar = _ARITH[g.ins.mnemonic]
    d = xreg(g, 0)
    s = xread(g, 1, w if scalar else 16)
    g.emit(f"SSE_ARITH(c, {op}, {d}, {s}, {w}, {scalar})")   # MXCSR: ssearith.py


def _cmp_em(g: Gen) -> None:
    check_sse(g)
    m = g.ins.mnemonic
    w = 8 if m in (M.CMPSD, M.CMPPD) else 4
    scalar = m in (M.CMPSD, M.CMPSS)
    d = xreg(g, 0)
    s = xread(g, 1, w if scalar else 16)
    g.emit(f"SSE_CMP(c, {d}, {s}, {w}, {g.ins.immediate(2) & 7}, {scalar})")   # MXCSR: ssearith.py


def _comis(g: Gen) -> None:
    check_sse(g)
    w = 8 if g.ins.mnemonic in (M.UCOMISD, M.COMISD) else 4
    m = MASK[w]
    s = xread(g, 1, w)
    ordered = g.ins.mnemonic in (M.COMISS, M.COMISD, M.VCOMISS, M.VCOMISD)
    g.emit(f"t = SSE_COMIS(c, c.xmm[{xreg(g, 0)}] & {m:#x}, {s} & {m:#x}, {w}, {ordered})")
    g.set_flags(F.RAW, 8, "t")


def _cvt_em(g: Gen) -> None:
    check_sse(g)
    m = g.ins.mnemonic
    if m in (M.CVTSI2SD, M.CVTSI2SS):
        w = 8 if m == M.CVTSI2SD else 4
        size = g.size(1)
        d = xreg(g, 0)
        g.emit(f"t = SSE_I2F(c, SX({g.read(1, size)}, {size}), {w})")
        g.emit(f"c.xmm[{d}] = (c.xmm[{d}] & ~{MASK[w]:#x}) | t")
    elif m in (M.CVTTSD2SI, M.CVTSD2SI, M.CVTTSS2SI, M.CVTSS2SI):
        w = 8 if m in (M.CVTTSD2SI, M.CVTSD2SI) else 4
        trunc = m in (M.CVTTSD2SI, M.CVTTSS2SI)
        s = xread(g, 1, w)
        size = g.size(0)
        g.emit(f"t = SSE_F2I(c, {s} & {MASK[w]:#x}, {w}, {size}, {trunc})")
        g.wreg(g.ins.op0_register, "t")
    elif m in (M.CVTSD2SS, M.CVTSS2SD):
        wf, wt = (8, 4) if m == M.CVTSD2SS else (4, 8)
        d = xreg(g, 0)
        s = xread(g, 1, wf)
        g.emit(f"t = SSE_F2F(c, {s} & {MASK[wf]:#x}, {wf}, {wt})")
        g.emit(f"c.xmm[{d}] = (c.xmm[{d}] & ~{MASK[wt]:#x}) | t")
    else:
        half = m in (M.CVTDQ2PD, M.CVTPS2PD)
        s = xread(g, 1, 8 if half else 16)
        g.emit(f"c.xmm[{xreg(g, 0)}] = SSE_CVT_PACKED(c, {_PACKED_KIND[m]!r}, {s})")


_PACKED_KIND = {M.CVTDQ2PS: "dq2ps", M.CVTDQ2PD: "dq2pd", M.CVTPS2DQ: "ps2dq", M.CVTTPS2DQ: "tps2dq",
                M.CVTPD2DQ: "pd2dq", M.CVTTPD2DQ: "tpd2dq", M.CVTPS2PD: "ps2pd", M.CVTPD2PS: "pd2ps"}


def _movs(g: Gen) -> None:
    """SSE movss/movsd."""
    check_sse(g)
    w = 8 if g.ins.mnemonic == M.MOVSD else 4
    mk = MASK[w]
    if g.is_mem(0):
        xwrite(g, 0, f"(c.xmm[{xreg(g, 1)}] & {mk:#x})", w)
    elif g.is_mem(1):
        g.emit(f"c.xmm[{xreg(g, 0)}] = {xread(g, 1, w)}")
    else:
        d = xreg(g, 0)
        g.emit(f"c.xmm[{d}] = (c.xmm[{d}] & ~{mk:#x}) | (c.xmm[{xreg(g, 1)}] & {mk:#x})")


EMITTERS = {m: _arith_em for m in _ARITH}
EMITTERS.update({M.CMPPD: _cmp_em, M.CMPPS: _cmp_em, M.CMPSS: _cmp_em,
                 M.UCOMISD: _comis, M.COMISD: _comis, M.UCOMISS: _comis, M.COMISS: _comis,
                 M.MOVSS: _movs})
for _m in (M.CVTSI2SD, M.CVTSI2SS, M.CVTTSD2SI, M.CVTSD2SI, M.CVTTSS2SI, M.CVTSS2SI, M.CVTSD2SS,
           M.CVTSS2SD, M.CVTDQ2PS, M.CVTDQ2PD, M.CVTTPS2DQ, M.CVTPS2DQ, M.CVTTPD2DQ, M.CVTPD2DQ,
           M.CVTPS2PD, M.CVTPD2PS):
    EMITTERS[_m] = _cvt_em

# movsd and cmpsd share their mnemonic with the string instructions.
SSE_STRING_TWINS = {M.MOVSD: _movs, M.CMPSD: _cmp_em}
