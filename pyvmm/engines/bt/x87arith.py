"""x87 basic arithmetic in exact 80-bit extended precision: add, subtract,
multiply, divide, square root, round to integer, compare, and the
conversions to and from binary32/binary64 memory operands.

Each operation is computed exactly on integer significands and rounded
once (x87image.pack_round) under FCW.RC to the precision FCW.PC selects
(24, 53 or 64 bits; the exponent keeps its 15-bit range), setting PE, C1,
OE, UE, DE, ZE and IE as the CPU does for masked exceptions. An unmasked
IE/DE/ZE leaves the operands alone (x87.farith) and #MF follows at the next
waiting instruction (x87state.x87_mf); an unmasked OE/UE leaves a register
result with its exponent rebiased by 24576 (x87image) and keeps a
binary32/64 store from happening (NOT_STORED).

Nothing here raises; results are 80-bit images (Python ints)."""

from __future__ import annotations

from math import isqrt

from .x87image import (BIAS, E_MIN, INF80, M64, OE, PE, SIGN, UE, ZE, denormal, is_inf, is_nan,
                       is_zero, nan_result, pack_round, round_unbounded, unpack)
from .x87state import C1, IE, INDEFINITE80

PC_BITS = (24, 64, 53, 64)       # FCW.PC: single, reserved, double, extended
FAR_APART = 140                  # an addend this many bits below the other is only a sticky bit
FORMATS = {4: (8, 23), 8: (11, 52)}   # binary32/64: exponent bits, fraction bits
NOT_STORED = -1                  # an FST whose unmasked exception keeps it from storing


def _bits(f) -> int:
    return PC_BITS[f.cw >> 8 & 3]


def _finish(f, r: int, *ops: int) -> int:
    denormal(f, r, *ops)
    return r


def add(f, a: int, b: int, negate_b: bool = False) -> int:
    """a + b (a - b with negate_b)."""
    f.sw &= ~C1
    if negate_b and not is_nan(b):
        b ^= SIGN
    r = nan_result(f, a, b)
    if r is not None:
        return r
    if is_inf(a) or is_inf(b):
        if is_inf(a) and is_inf(b) and (a ^ b) & SIGN:
            f.sw |= IE
            return INDEFINITE80
        return _finish(f, a if is_inf(a) else b, a, b)
    sa, ea, ma = unpack(a)
    sb, eb, mb = unpack(b)
    if ma == 0 and mb == 0:
        if sa == sb:
            return _finish(f, sa << 79, a, b)
        return _finish(f, SIGN if f.cw >> 10 & 3 == 1 else 0, a, b)
    # keep exact sums small: a far smaller addend only decides the rounding
    if ma and mb:
        if ea + ma.bit_length() - FAR_APART > eb + mb.bit_length():
            mb, eb = 1, ea + ma.bit_length() - FAR_APART - 1
        elif eb + mb.bit_length() - FAR_APART > ea + ma.bit_length():
            ma, ea = 1, eb + mb.bit_length() - FAR_APART - 1
    e = min(ea, eb)
    total = (-1 if sa else 1) * (ma << (ea - e)) + (-1 if sb else 1) * (mb << (eb - e))
    if total == 0:
        return _finish(f, SIGN if f.cw >> 10 & 3 == 1 else 0, a, b)
    return _finish(f, pack_round(f, 1 if total < 0 else 0, abs(total), e, _bits(f)), a, b)


def mul(f, a: int, b: int) -> int:
    f.sw &= ~C1
    r = nan_result(f, a, b)
    if r is not None:
        return r
    sign = (a ^ b) & SIGN
    if is_inf(a) or is_inf(b):
        if is_zero(a) or is_zero(b):
            f.sw |= IE
            return INDEFINITE80
        return _finish(f, sign | INF80, a, b)
    sa, ea, ma = unpack(a)
    sb, eb, mb = unpack(b)
    if ma == 0 or mb == 0:
        return _finish(f, sign, a, b)
    return _finish(f, pack_round(f, sign >> 79, ma * mb, ea + eb, _bits(f)), a, b)


def div(f, a: int, b: int) -> int:
    """a / b."""
    f.sw &= ~C1
    r = nan_result(f, a, b)
    if r is not None:
        return r
    sign = (a ^ b) & SIGN
    if is_inf(a):
        if is_inf(b):
            f.sw |= IE
            return INDEFINITE80
        return _finish(f, sign | INF80, a, b)
    if is_inf(b):
        return _finish(f, sign, a, b)
    sa, ea, ma = unpack(a)
    sb, eb, mb = unpack(b)
    if mb == 0:
        if ma == 0:
            f.sw |= IE
            return INDEFINITE80
        f.sw |= ZE
        return sign | INF80         # ZE takes precedence over DE
    if ma == 0:
        return _finish(f, sign, a, b)
    shift = 68 + mb.bit_length() - ma.bit_length()
    q, rem = divmod(ma << shift, mb)      # q has 68 or 69 bits; rem decides the sticky bit
    return _finish(f, pack_round(f, sign >> 79, q << 1 | (rem != 0), ea - eb - shift - 1, _bits(f)), a, b)


def sqrt(f, a: int) -> int:
    f.sw &= ~C1
    r = nan_result(f, a)
    if r is not None:
        return r
    if is_zero(a):
        return _finish(f, a, a)
    if a & SIGN:
        f.sw |= IE
        return INDEFINITE80
    if is_inf(a):
        return a
    _, e, m = unpack(a)
    shift = 140 - m.bit_length()
    if (e - shift) & 1:
        shift += 1
    m <<= shift
    root = isqrt(m)
    return _finish(f, pack_round(f, 0, root << 1 | (root * root != m), (e - shift) // 2 - 1, _bits(f)), a)


def round_int(f, a: int) -> int:
    """FRNDINT: ST(0) rounded to an integer under FCW.RC (PE when inexact)."""
    f.sw &= ~C1
    r = nan_result(f, a)
    if r is not None:
        return r
    if is_inf(a) or is_zero(a):
        return a
    s, e, m = unpack(a)
    if e >= 0:
        return _finish(f, a, a)
    q, rem = m >> -e, m & ((1 << -e) - 1)
    if rem:
        f.sw |= PE
        rc = f.cw >> 10 & 3
        half = 1 << (-e - 1)
        if rc == 0 and (rem > half or rem == half and q & 1) or rc == 1 and s or rc == 2 and not s:
            q += 1
            f.sw |= C1
    if q == 0:
        return _finish(f, s << 79, a)
    n = q.bit_length()
    return _finish(f, s << 79 | (BIAS + n - 1) << 64 | q << (64 - n), a)


def compare(a: int, b: int) -> int | None:
    """-1, 0 or 1 as a < b, a == b, a > b; None when unordered (a NaN or an unsupported format)."""
    if is_nan(a) or is_nan(b) or _unsupported(a) or _unsupported(b):
        return None
    if is_zero(a) and is_zero(b):
        return 0
    ka, kb = _key(a), _key(b)
    return (ka > kb) - (ka < kb)


def _unsupported(b: int) -> bool:
    return b >> 64 & 0x7FFF != 0 and not b >> 63 & 1


def _key(b: int) -> int:
    """An integer that orders 80-bit values (denormals and pseudo-denormals included)."""
    if is_inf(b):
        mag = 1 << 40000         # above every finite value
    elif is_zero(b):
        mag = 0
    else:
        _, e, m = unpack(b)
        mag = m << (e - E_MIN)   # exact: every finite value is a multiple of 2**E_MIN
    return -mag if b & SIGN else mag


# -- memory formats ---------------------------------------------------------------------
def is_denormal_float(v: int, size: int) -> bool:
    ebits, fbits = FORMATS[size]
    return not v >> fbits & ((1 << ebits) - 1) and v & ((1 << fbits) - 1) != 0


def from_float_bits(v: int, size: int) -> int:
    """The exact 80-bit image of a binary32/binary64 value; a signalling NaN
    stays signalling (FLD quietens it, an arithmetic operation picks it)."""
    ebits, fbits = FORMATS[size]
    sign = v >> (ebits + fbits) & 1
    exp, frac = v >> fbits & ((1 << ebits) - 1), v & ((1 << fbits) - 1)
    if exp == (1 << ebits) - 1:
        if frac == 0:
            return sign << 79 | INF80
        return sign << 79 | 0x7FFF << 64 | 1 << 63 | frac << (63 - fbits)
    if exp == 0:
        if frac == 0:
            return sign << 79
        n = frac.bit_length()
        e = 1 - (1 << (ebits - 1)) + 1 - fbits   # exponent of the fraction's bit 0
        return sign << 79 | (BIAS + e + n - 1) << 64 | frac << (64 - n)
    return sign << 79 | (exp - (1 << (ebits - 1)) + 1 + BIAS) << 64 | 1 << 63 | frac << (63 - fbits)


def _unmasked_store_fault(f, b: int, size: int, before: int) -> int | None:
    """FST m32/m64 of a value that overflows, or is tiny, with that
    exception unmasked: the CPU stores nothing and leaves ST(0) alone, and
    FSW gets OE or UE alone (no PE, C1 clear).  Returns NOT_STORED then."""
    ebits, fbits = FORMATS[size]
    sign, e, m = unpack(b)
    bias = (1 << (ebits - 1)) - 1
    m, e, _, _ = round_unbounded(sign, m, e, fbits + 1, f.cw >> 10 & 3)
    biased = e + m.bit_length() - 1 + bias
    if biased >= (1 << ebits) - 1 and not f.cw & OE:
        f.sw = before | OE
    elif biased < 1 and not f.cw & UE:
        f.sw = before | UE
    else:
        return None
    return NOT_STORED


def to_float_bits(f, b: int, size: int) -> int:
    """ST(0)'s image rounded to binary32/binary64 under FCW.RC (FST m32/m64):
    PE and C1, OE, UE (no DE: the CPU flags none for a denormal source); a
    NaN keeps the top of its payload, made quiet."""
    ebits, fbits = FORMATS[size]
    f.sw &= ~C1
    before = f.sw
    sign = b >> 79 & 1
    top_sign = sign << (ebits + fbits)
    emax = (1 << ebits) - 1
    if is_nan(b) or _unsupported(b):
        if _unsupported(b) or not b >> 62 & 1:
            f.sw |= IE
        if _unsupported(b):
            return (1 << (ebits + fbits)) | emax << fbits | 1 << (fbits - 1)   # the indefinite
        return top_sign | emax << fbits | 1 << (fbits - 1) | (b & (M64 >> 1)) >> (63 - fbits)
    if is_inf(b):
        return top_sign | emax << fbits
    if is_zero(b):
        return top_sign
    _, e, m = unpack(b)
    bias = (1 << (ebits - 1)) - 1
    e_min = 1 - bias - fbits          # exponent of bit 0 of the format's denormals
    drop = max(m.bit_length() - (fbits + 1), e_min - e)
    up = inexact = False
    rc = f.cw >> 10 & 3
    if drop > 0:
        rem, half = m & ((1 << drop) - 1), 1 << (drop - 1)
        m >>= drop
        e += drop
        inexact = rem != 0
        if inexact:
            up = (rem > half or rem == half and bool(m & 1)) if rc == 0 else (
                rc == 1 and bool(sign) or rc == 2 and not sign)
        if up:
            m += 1
            if m.bit_length() > fbits + 1:
                m >>= 1
                e += 1
    if inexact:
        f.sw |= PE | (C1 if up else 0)
    n = m.bit_length()
    biased = e + n - 1 + bias
    if f.cw & (OE | UE) != OE | UE:
        unmasked = _unmasked_store_fault(f, b, size, before)
        if unmasked is not None:
            return unmasked
    if m == 0:
        if inexact:
            f.sw |= UE
        return top_sign
    if biased >= emax:
        f.sw |= OE | PE
        to_inf = rc == 0 or rc == 1 and sign or rc == 2 and not sign
        if to_inf:
            f.sw |= C1
            return top_sign | emax << fbits
        return top_sign | (emax - 1) << fbits | ((1 << fbits) - 1)
    if biased < 1:
        if inexact:
            f.sw |= UE
        return top_sign | m << (e - e_min)
    return top_sign | biased << fbits | (m << (fbits + 1 - n)) & ((1 << fbits) - 1)
