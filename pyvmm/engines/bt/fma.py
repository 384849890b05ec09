"""FMA3: VFMADD/VFMSUB/VFNMADD/VFNMSUB/VFMADDSUB/VFMSUBADD in the 132, 213
and 231 operand orders, packed (PS/PD, VEX.128/256) and scalar (SS/SD).

a*b+c is computed exactly on the integer significands (fpround) and
rounded once per MXCSR.RC, with DAZ and FTZ; the MXCSR exception flags are
set as the SDM describes; an exception whose mask bit is clear leaves the
destination alone, sets its flags and raises #XM (#UD without
CR4.OSXMMEXCPT).

Generated code raises GuestFault as described in vex.py."""

from __future__ import annotations

import re
import struct

import iced_x86 as X

from . import fpround as R
from .gen import Gen
from .simd import M128
from .vex import check_avx, unmasked_fault, vread, vreg, vwrite

M = X.Mnemonic
M64 = 0xFFFFFFFFFFFFFFFF
MXCSR_DAZ, MXCSR_FTZ = 0x40, 0x8000


def fma1(x: int, y: int, z: int, w: int, neg_prod: bool, neg_add: bool, mx: int) -> tuple[int, int]:
    """One element of (-)x*y (+/-) z, no operand a NaN (see _nan_result);
    returns (bits, flags)."""
    rc = mx >> 13 & 3
    ca, sa, ma, ea = R.decode(x, w)
    cb, sb, mb, eb = R.decode(y, w)
    cc, sc, mc, ec = R.decode(z, w)
    classes = (ca, cb, cc)
    flags = 0
    if R.DENORMAL in classes:
        if mx & MXCSR_DAZ:
            if ca == R.DENORMAL:
                ca, ma = R.ZERO, 0
            if cb == R.DENORMAL:
                cb, mb = R.ZERO, 0
            if cc == R.DENORMAL:
                cc, mc = R.ZERO, 0
        else:
            flags |= R.DE
    sp = sa ^ sb ^ neg_prod
    sc ^= neg_add
    prod_inf = R.INF in (ca, cb)
    if prod_inf and R.ZERO in (ca, cb):
        return R.default_nan(w), R.IE
    if prod_inf:
        if cc == R.INF and sc != sp:
            return R.default_nan(w), R.IE
        return R.infinity(sp, w), flags
    if cc == R.INF:
        return R.infinity(sc, w), flags
    e = min(ea + eb, ec)
    p = (ma * mb) << (ea + eb - e)
    q = mc << (ec - e)
    total = (-p if sp else p) + (-q if sc else q)
    if total == 0:
        if p == 0 and q == 0 and sp == sc:
            return sp << (8 * w - 1), flags
        return (1 if rc == 1 else 0) << (8 * w - 1), flags
    bits, f = R.round_pack(1 if total < 0 else 0, abs(total), e, w, rc, bool(mx & MXCSR_FTZ))
    return bits, flags | f


def _nan_result(ops: tuple, w: int) -> tuple[int, int] | None:
    """The NaN result and flags when an operand is a NaN: the first NaN of
    a, b, c in a*b+c (whatever the operand order), quieted; IE for any SNaN
    (an inf*0 product beside a quiet NaN raises nothing, as the CPU does)."""
    cls = [R.decode(v, w)[0] for v in ops]
    if R.QNAN not in cls and R.SNAN not in cls:
        return None
    flags = R.IE if R.SNAN in cls else 0
    first = next(v for v, k in zip(ops, cls) if k in (R.QNAN, R.SNAN))
    return R.quiet(first, w), flags


# mnemonic -> (order, kind): order "132"/"213"/"231"; kind names the sign pattern.
_KINDS = {"MADD": (0, 0), "MSUB": (0, 1), "NMADD": (1, 0), "NMSUB": (1, 1)}


_F32, _D64 = struct.Struct("<f"), struct.Struct("<d")
_FLT_MAX = 3.4028234663852886e38
_FLT_MIN = 1.1754943508222875e-38


def _fast32(x: int, y: int, z: int, fx: float, fy: float, fz: float, neg_prod: bool,
            neg_add: bool) -> tuple[int, int] | None:
    """Single precision under round-to-nearest, when every input is normal
    or zero and the result is normal: the product is exact in a double, and
    the double sum's rounding error (TwoSum) shows whether rounding that sum
    to single can differ from rounding the exact value once (only at a tie).
    None where the exact path must decide."""
    for v in (x, y, z):
        e = v & 0x7F800000
        if e == 0x7F800000 or (not e and v & 0x7FFFFF):
            return None
    p = -(fx * fy) if neg_prod else fx * fy
    if neg_add:
        fz = -fz
    t = p + fz
    bp = t - fz
    err = (fz - (t - bp)) + (p - bp)     # TwoSum: t + err == p + fz exactly
    a = abs(t)
    if a == 0.0 and not err:     # an exact zero: the double sum has IEEE's signs of zero
        return int.from_bytes(_F32.pack(t), "little"), 0
    if not _FLT_MIN <= a < _FLT_MAX:
        return None
    if err and (int.from_bytes(_D64.pack(t), "little") & 0x1FFFFFFF) == 0x10000000:
        return None     # a tie in single precision that the sum's error decides
    packed = _F32.pack(t)
    r = int.from_bytes(packed, "little")
    return r, (R.PE if err or _F32.unpack(packed)[0] != t else 0)


def fma(d: int, s2: int, s3: int, order: int, kind: str, w: int, n: int, mx: int) -> tuple[int, int]:
    """n elements of width w of the FMA named by order/kind on the operand
    values d (dst, src1), s2, s3; returns (result, the exception flags raised)."""
    bits = 8 * w
    m = (1 << bits) - 1
    out, flags = 0, 0
    fast = w == 4 and not mx & 0x6000
    if fast:
        nb = 4 * n
        f1, f2, f3 = (struct.unpack(f"<{n}f", (v & ((1 << (8 * nb)) - 1)).to_bytes(nb, "little"))
                      for v in (d, s2, s3))
    for i in range(n):
        sh = bits * i
        v1, v2, v3 = d >> sh & m, s2 >> sh & m, s3 >> sh & m
        x, y, z = {132: (v1, v3, v2), 213: (v2, v1, v3), 231: (v2, v3, v1)}[order]
        if kind == "MADDSUB":
            neg_prod, neg_add = False, i % 2 == 0
        elif kind == "MSUBADD":
            neg_prod, neg_add = False, i % 2 == 1
        else:
            neg_prod, neg_add = _KINDS[kind]
        if fast:
            fx, fy, fz = {132: (f1, f3, f2), 213: (f2, f1, f3), 231: (f2, f3, f1)}[order]
            got = _fast32(x, y, z, fx[i], fy[i], fz[i], neg_prod, neg_add)
            if got is not None:
                out |= got[0] << sh
                flags |= got[1]
                continue
        nan = _nan_result((x, y, z), w)
        if nan is not None:
            r, f = nan
        else:
            r, f = fma1(x, y, z, w, neg_prod, neg_add, mx)
        out |= r << sh
        flags |= f
    return out, flags


EXPORTS = {"FMA": fma}
_NAME = re.compile(r"VF(N?M(?:ADD|SUB)(?:SUB|ADD)?)(132|213|231)(P|S)(S|D)$")
_NAMES = {v: k for k, v in vars(M).items() if k.isupper()}


def _fma(g: Gen) -> None:
    kind, order, ps, sd = _NAME.match(_NAMES[g.ins.mnemonic]).groups()
    w = 4 if sd == "S" else 8
    d, dw = vreg(g, 0)
    check_avx(g)
    s2 = vread(g, 1)
    s3 = vread(g, 2, w if ps == "S" else None)
    g.emit(f"_d = c.xmm[{d}]" + (f" | c.ymmh[{d}] << 128" if dw == 32 else ""))
    n = 1 if ps == "S" else dw // w
    g.emit(f"_r, _f = FMA(_d, {s2}, {s3}, {order}, {kind!r}, {w}, {n}, c.mxcsr)")
    unmasked_fault(g)
    if ps == "S":
        keep = M128 ^ ((1 << (8 * w)) - 1)
        vwrite(g, 0, f"(_d & {keep:#x}) | _r")
    else:
        vwrite(g, 0, "_r")


EMITTERS = {m: _fma for m, name in _NAMES.items() if _NAME.match(name)}
