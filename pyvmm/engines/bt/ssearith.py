"""SSE/SSE2 arithmetic (ADD, SUB, MUL, DIV, SQRT, MIN, MAX in SS/SD/PS/PD
forms) under MXCSR: the four rounding modes, DAZ and FTZ, the six
exception flags, and unmasked exceptions (Intel SDM Vol. 1, 11.5).

Each lane is computed exactly on integer significands and rounded once
(fpround.py).  Flags follow the SDM's priorities (11.5.2.1): an SNaN
operand gives IE; a QNaN operand gives no flag (and hides DE); an invalid
operation (inf - inf, 0 * inf, 0/0, inf/inf, sqrt of a negative) gives IE;
then ZE, DE (a denormal operand, unless DAZ), OE/UE/PE from rounding.
A packed instruction sets the flags of all its lanes, but when one of
them has an unmasked IE/DE/ZE the CPU stops before computing, and no
lane reports OE/UE/PE.  When a flag is
raised whose mask bit is clear, the destination is left unchanged, the
flags are still set in MXCSR, and the CPU raises #XM (CR4.OSXMMEXCPT) or
#UD: `arith_mx` returns the vector then."""

from __future__ import annotations

import struct
from math import isqrt, sqrt

from . import fpround as R
from .faults import GuestFault

_D, _Fs = struct.Struct("<d"), struct.Struct("<f")

DAZ, FTZ = 0x40, 0x8000
XM, UD = 19, 6
CR4_OSXMMEXCPT = 1 << 10
ADD, SUB, MUL, DIV, MIN, MAX, SQRT = range(7)
_PRE = R.IE | R.DE | R.ZE      # found before computing (SDM Vol. 1, 11.5.2)
UM = 0x800
_EXP = {4: 0x7F800000, 8: 0x7FF0000000000000}


def _round(sign: int, mant: int, exp: int, w: int, rc: int, mx: int) -> tuple[int, int]:
    """fpround.round_pack under MXCSR.  FTZ applies only with UE masked.
    An unmasked UE or OE is judged on the result rounded with an unbounded
    exponent (the one a handler would see): UE for any tiny result, exact
    or not, and PE only when that result is inexact."""
    bits, f = R.round_pack(sign, mant, exp, w, rc, bool(mx & FTZ) and bool(mx & UM))
    unmasked = ~mx >> 7
    if unmasked & (R.UE | R.OE):
        extra = mant.bit_length() - (R.FORMATS[w][1] + 1)
        pe = R.PE if extra > 0 and mant & ((1 << extra) - 1) else 0
        if unmasked & R.UE and bits & _EXP[w] == 0:
            f = R.UE | pe
        elif unmasked & R.OE and f & R.OE:
            f = R.OE | pe
    return bits, f


def _lane(op: int, a: int, b: int, w: int, mx: int) -> tuple[int, int]:
    """One element: (result bits, flags).  For SQRT the operand is b."""
    rc = mx >> 13 & 3
    ca, sa, ma, ea = R.decode(a, w)
    cb, sb, mb, eb = R.decode(b, w)
    if op == SQRT:
        ca, sa = R.ZERO, 0
    nans = [k for k in (ca, cb) if k in (R.QNAN, R.SNAN)]
    if op in (MIN, MAX):
        flags = 0
        if R.DENORMAL in (ca, cb):
            if mx & DAZ:        # before the NaN test: the result may be the zeroed b
                a = a & (1 << (8 * w - 1)) if ca == R.DENORMAL else a
                b = b & (1 << (8 * w - 1)) if cb == R.DENORMAL else b
            else:
                flags = R.DE
        if nans:
            return b, R.IE
        x, y = _to_float(a, w), _to_float(b, w)      # exact: no NaN here
        if x == y:
            return b, flags
        return (a if (x < y) == (op == MIN) else b), flags
    if nans:
        flags = R.IE if R.SNAN in nans else 0
        first = a if ca in (R.QNAN, R.SNAN) else b
        return R.quiet(first, w), flags
    flags = 0
    if R.DENORMAL in (ca, cb):
        if mx & DAZ:
            if ca == R.DENORMAL:
                ca, ma = R.ZERO, 0
            if cb == R.DENORMAL:
                cb, mb = R.ZERO, 0
        else:
            flags = R.DE
    if op == SUB:
        sb ^= 1
    if op in (ADD, SUB):
        if ca == R.INF or cb == R.INF:
            if ca == cb == R.INF and sa != sb:
                return R.default_nan(w), R.IE
            return R.infinity(sa if ca == R.INF else sb, w), flags
        e = min(ea, eb)
        total = (-1 if sa else 1) * (ma << (ea - e)) + (-1 if sb else 1) * (mb << (eb - e))
        if total == 0:
            if ma == 0 and mb == 0 and sa == sb:
                return sa << (8 * w - 1), flags
            return (1 if rc == 1 else 0) << (8 * w - 1), flags
        bits, f = _round(1 if total < 0 else 0, abs(total), e, w, rc, mx)
        return bits, flags | f
    if op == MUL:
        s = sa ^ sb
        if R.INF in (ca, cb):
            if R.ZERO in (ca, cb):
                return R.default_nan(w), R.IE
            return R.infinity(s, w), flags
        if R.ZERO in (ca, cb):
            return s << (8 * w - 1), flags
        bits, f = _round(s, ma * mb, ea + eb, w, rc, mx)
        return bits, flags | f
    if op == DIV:
        s = sa ^ sb
        if ca == R.INF:
            if cb == R.INF:
                return R.default_nan(w), R.IE
            return R.infinity(s, w), flags
        if cb == R.INF:
            return s << (8 * w - 1), flags
        if cb == R.ZERO:
            if ca == R.ZERO:
                return R.default_nan(w), R.IE
            return R.infinity(s, w), R.ZE            # ZE outranks DE (SDM Vol. 1, 11.5.2.1)
        if ca == R.ZERO:
            return s << (8 * w - 1), flags
        k = 2 * 8 * w + mb.bit_length() + 3             # quotient bits well past the format
        q, r = divmod(ma << k, mb)
        bits, f = _round(s, q << 1 | (r != 0), ea - eb - k - 1, w, rc, mx)
        return bits, flags | f
    # SQRT
    if cb == R.ZERO:
        return sb << (8 * w - 1), flags              # (a denormal under DAZ too)
    if sb:
        return R.default_nan(w), R.IE
    if cb == R.INF:
        return b, flags
    k = 2 * 8 * w + 4
    if (eb - k) & 1:
        k += 1
    m = mb << k
    root = isqrt(m)
    bits, f = _round(0, root << 1 | (root * root != m), (eb - k) // 2 - 1, w, rc, mx)
    return bits, flags | f


def _to_float(bits: int, w: int) -> float:
    return _D.unpack(bits.to_bytes(8, "little"))[0] if w == 8 else _Fs.unpack(bits.to_bytes(4, "little"))[0]


_NORMAL = {4: (0x7F800000, 0x00800000), 8: (0x7FF0000000000000, 0x0010000000000000)}


def _fast_lane(op: int, a: int, b: int, w: int) -> int | None:
    """The common case on host floats: MXCSR at its default (all masked,
    round to nearest, no DAZ/FTZ) with PE already set (sticky, so an
    inexact result changes nothing), normal operands and a normal result:
    then no flag can change and the IEEE double result is exact-rounded
    (single precision rounds the double once more, which is innocuous for
    + - * / sqrt since 53 >= 2 * 24 + 2).  None: take the exact path."""
    emask, emin = _NORMAL[w]
    if not (emin <= b & emask < emask) or op != SQRT and not (emin <= a & emask < emask):
        return None
    y = _to_float(b, w)
    if op == SQRT:
        if y < 0:
            return None
        r = sqrt(y)                  # correctly rounded (IEEE), unlike y ** 0.5
    else:
        x = _to_float(a, w)
        r = x + y if op == ADD else x - y if op == SUB else x * y if op == MUL else x / y
    try:
        bits = int.from_bytes((_D if w == 8 else _Fs).pack(r), "little")
    except OverflowError:
        return None
    return bits if emin <= bits & emask < emask else None


def arith_mx(op: int, d: int, s: int, w: int, scalar: bool, mx: int, cr4: int) -> tuple[int, int, int]:
    """The instruction on 128-bit values d (destination) and s: returns
    (result, new MXCSR, vector): vector 0 when no unmasked exception
    (result stored), else XM or UD (result = d, MXCSR has the flags)."""
    bits = 8 * w
    m = (1 << bits) - 1
    n = 1 if scalar else 16 // w
    out = d & ~m if scalar else 0
    flags = 0
    fast = mx & 0xFFE0 == 0x1FA0 and op <= DIV or op == SQRT and mx & 0xFFE0 == 0x1FA0
    for i in range(n):
        sh = bits * i
        a, b = d >> sh & m, s >> sh & m
        r = _fast_lane(op, a, b, w) if fast else None
        if r is None:
            r, f = _lane(op, a, b, w, mx)
            flags |= f
        out |= r << sh
    unmasked = flags & ~(mx >> 7) & 0x3F
    if unmasked & _PRE:
        flags &= _PRE          # stopped before computing: no lane reports OE/UE/PE
    if unmasked:
        return d, mx | flags, XM if cr4 & CR4_OSXMMEXCPT else UD
    return out, mx | flags, 0


def lanes_mx(c, pairs: list[tuple[int, int, int]], w: int) -> list[int]:
    """Element results of (op, a, b) triples under MXCSR, for instructions
    that pair lanes their own way (SSE3's addsub/hadd/hsub).  Sets the
    flags; raises #XM/#UD when one is unmasked, before any result is kept."""
    mx = c.mxcsr
    fast = mx & 0xFFE0 == 0x1FA0
    out, flags = [], 0
    for op, a, b in pairs:
        r = _fast_lane(op, a, b, w) if fast else None
        if r is None:
            r, f = _lane(op, a, b, w, mx)
            flags |= f
        out.append(r)
    _raise_unmasked(c, flags)
    return out


def sse_arith(c, op: int, d: int, s: int, w: int, scalar: bool) -> None:
    """The helper translated code calls: XMM register d op= s (128-bit
    value), MXCSR updated.  Raises GuestFault(#XM or #UD) for an unmasked
    exception, with the flags set and XMM d unchanged."""
    out, c.mxcsr, vec = arith_mx(op, c.xmm[d], s, w, scalar, c.mxcsr, c.cr4)
    if vec:
        raise GuestFault(vec)
    c.xmm[d] = out


# -- compares: CMPccPS/PD/SS/SD (predicates 0-7) and (U)COMISS/SD ------------------------
_QUIET_PREDS = frozenset({0, 3, 4, 7})      # EQ, UNORD, NEQ, ORD: IE for SNaN only


def _cmp_lane(a: int, b: int, w: int, mx: int, signal_qnan: bool) -> tuple[int | None, int]:
    """(-1, 0 or 1 for a < = > b, or None unordered; flags) with DAZ."""
    ca, sa, _, _ = R.decode(a, w)
    cb, sb, _, _ = R.decode(b, w)
    nans = [k for k in (ca, cb) if k in (R.QNAN, R.SNAN)]
    if nans:
        return None, R.IE if R.SNAN in nans or signal_qnan else 0
    flags = 0
    if R.DENORMAL in (ca, cb):
        if mx & DAZ:
            a = a & (1 << (8 * w - 1)) if ca == R.DENORMAL else a
            b = b & (1 << (8 * w - 1)) if cb == R.DENORMAL else b
        else:
            flags = R.DE
    x, y = _to_float(a, w), _to_float(b, w)
    return (x > y) - (x < y), flags


def cmp_mx(d: int, s: int, w: int, pred: int, scalar: bool, mx: int) -> tuple[int, int]:
    """CMPcc on 128-bit values: (result, flags)."""
    bits = 8 * w
    m = (1 << bits) - 1
    n = 1 if scalar else 16 // w
    out = d & ~m if scalar else 0
    flags = 0
    for i in range(n):
        sh = bits * i
        r, f = _cmp_lane(d >> sh & m, s >> sh & m, w, mx, pred not in _QUIET_PREDS)
        flags |= f
        holds = (pred in (3, 4, 5, 6)) if r is None else \
            (r == 0, r < 0, r <= 0, False, r != 0, not r < 0, not r <= 0, True)[pred]
        if holds:
            out |= m << sh
    return out, flags


def _raise_unmasked(c, flags: int) -> None:
    """Sets the flags in MXCSR; raises #XM/#UD when one is unmasked (with
    an unmasked IE/DE/ZE no OE/UE/PE is reported, as in arith_mx)."""
    unmasked = flags & ~(c.mxcsr >> 7) & 0x3F
    if unmasked & _PRE:
        flags &= _PRE
    c.mxcsr |= flags
    if unmasked:
        raise GuestFault(XM if c.cr4 & CR4_OSXMMEXCPT else UD)


def sse_cmp(c, d: int, s: int, w: int, pred: int, scalar: bool) -> None:
    """The CMPcc helper: XMM d compared with s; #XM/#UD when unmasked."""
    out, flags = cmp_mx(c.xmm[d], s, w, pred, scalar, c.mxcsr)
    _raise_unmasked(c, flags)
    c.xmm[d] = out


def sse_comis(c, a: int, b: int, w: int, ordered: bool) -> int:
    """(U)COMIS: the RAW flags word ZF PF CF; COMIS signals IE for any NaN,
    UCOMIS for SNaN only.  Raises #XM/#UD (flags unchanged) when unmasked."""
    from . import flags as Fl
    r, flags = _cmp_lane(a, b, w, c.mxcsr, ordered)
    _raise_unmasked(c, flags)
    if r is None:
        return Fl.ZF | Fl.PF | Fl.CF
    return Fl.ZF if r == 0 else Fl.CF if r < 0 else 0


# -- conversions ----------------------------------------------------------------------------
def _i2f(v: int, w: int, mx: int) -> tuple[int, int]:
    """A signed integer to binary32/64 under MXCSR.RC (PE when inexact)."""
    if v == 0:
        return 0, 0
    return _round(1 if v < 0 else 0, abs(v), 0, w, mx >> 13 & 3, mx | UM)


def _f2i(b: int, w: int, size: int, trunc: bool, mx: int) -> tuple[int, int]:
    """binary32/64 to a signed integer of `size` bytes (truncating, or
    under MXCSR.RC): NaN, infinity and out of range give the integer
    indefinite value and IE; PE when inexact."""
    indef = 1 << (8 * size - 1)
    cls, sign, mant, exp = R.decode(b, w)
    if cls in (R.QNAN, R.SNAN, R.INF):
        return indef, R.IE
    if cls == R.ZERO or (cls == R.DENORMAL and mx & DAZ):
        return 0, 0
    if exp >= 0:
        q, inexact = mant << exp, False
    else:
        q, inexact = R._round_at(mant, -exp, sign, 3 if trunc else mx >> 13 & 3)
    v = -q if sign else q
    if not -indef <= v < indef:
        return indef, R.IE
    return v & ((1 << (8 * size)) - 1), R.PE if inexact else 0


def _f2f(b: int, wf: int, wt: int, mx: int) -> tuple[int, int]:
    """binary32 <-> binary64: SNaN gives IE (NaNs are quieted, the payload
    kept), a denormal operand DE unless DAZ, narrowing rounds under RC/FTZ."""
    cls, sign, mant, exp = R.decode(b, wf)
    if cls in (R.QNAN, R.SNAN):
        ff, ft = R.FORMATS[wf][1], R.FORMATS[wt][1]
        payload = mant << (ft - ff) if ft > ff else mant >> (ff - ft)
        return R.quiet(sign << (8 * wt - 1) | R.infinity(0, wt) | payload, wt), (R.IE if cls == R.SNAN else 0)
    if cls == R.INF:
        return R.infinity(sign, wt), 0
    flags = 0
    if cls == R.DENORMAL:
        if mx & DAZ:
            cls = R.ZERO
        else:
            flags = R.DE
    if cls == R.ZERO:
        return sign << (8 * wt - 1), flags
    bits, f = _round(sign, mant, exp, wt, mx >> 13 & 3, mx)
    return bits, flags | f


def sse_i2f(c, v: int, w: int) -> int:
    bits, flags = _i2f(v, w, c.mxcsr)
    _raise_unmasked(c, flags)
    return bits


def sse_f2i(c, b: int, w: int, size: int, trunc: bool) -> int:
    v, flags = _f2i(b, w, size, trunc, c.mxcsr)
    _raise_unmasked(c, flags)
    return v


def sse_f2f(c, b: int, wf: int, wt: int) -> int:
    bits, flags = _f2f(b, wf, wt, c.mxcsr)
    _raise_unmasked(c, flags)
    return bits


def sse_cvt_packed(c, kind: str, s: int) -> int:
    """Packed conversions: kind names source and result ("dq2ps", "ps2dq",
    "tps2dq", "dq2pd", "pd2dq", "tpd2dq", "ps2pd", "pd2ps"); lanes beyond
    the results are zero.  Raises #XM/#UD for an unmasked exception."""
    mx, flags, out = c.mxcsr, 0, 0
    trunc = kind.startswith("t")
    k = kind.lstrip("t")
    src_w = {"dq2ps": 4, "dq2pd": 4, "ps2dq": 4, "ps2pd": 4, "pd2dq": 8, "pd2ps": 8}[k]
    dst_w = {"dq2ps": 4, "dq2pd": 8, "ps2dq": 4, "ps2pd": 8, "pd2dq": 4, "pd2ps": 4}[k]
    n = min(16 // src_w, 16 // dst_w)
    sm = (1 << (8 * src_w)) - 1
    for i in range(n):
        v = s >> (8 * src_w * i) & sm
        if k.startswith("dq"):
            r, f = _i2f(v - (1 << 32) if v >> 31 else v, dst_w, mx)
        elif k.endswith("dq"):
            r, f = _f2i(v, src_w, 4, trunc, mx)
        else:
            r, f = _f2f(v, src_w, dst_w, mx)
        out |= r << (8 * dst_w * i)
        flags |= f
    _raise_unmasked(c, flags)
    return out
