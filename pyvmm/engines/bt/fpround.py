"""Exact IEEE binary16/32/64 decoding and one-step rounding for the
instructions that must round only once (FMA3) or to a format the host has
no type for (F16C): values are handled as integer significand times a
power of two, and rounded once per an x86 rounding control (0 nearest-even,
1 down, 2 up, 3 toward zero).

MXCSR exception flags are returned as bits: IE 1, DE 2, ZE 4, OE 8, UE 0x10,
PE 0x20 (all masked: the default results of the SDM are returned).
Tininess is detected after rounding, as x86 does."""

from __future__ import annotations

IE, DE, ZE, OE, UE, PE = 1, 2, 4, 8, 0x10, 0x20
# width in bytes -> (exponent bits, fraction bits)
FORMATS = {2: (5, 10), 4: (8, 23), 8: (11, 52)}
ZERO, DENORMAL, NORMAL, INF, QNAN, SNAN = range(6)


def decode(b: int, w: int) -> tuple[int, int, int, int]:
    """(class, sign, significand, exponent): a finite value is
    (-1)**sign * significand * 2**exponent."""
    ebits, fbits = FORMATS[w]
    sign = b >> (8 * w - 1) & 1
    e = b >> fbits & ((1 << ebits) - 1)
    f = b & ((1 << fbits) - 1)
    bias = (1 << (ebits - 1)) - 1
    if e == (1 << ebits) - 1:
        if f == 0:
            return INF, sign, 0, 0
        return (QNAN if f >> (fbits - 1) else SNAN), sign, f, 0
    if e == 0:
        return (ZERO if f == 0 else DENORMAL), sign, f, 1 - bias - fbits
    return NORMAL, sign, f | 1 << fbits, e - bias - fbits


def infinity(sign: int, w: int) -> int:
    ebits, fbits = FORMATS[w]
    return sign << (8 * w - 1) | ((1 << ebits) - 1) << fbits


def default_nan(w: int) -> int:
    ebits, fbits = FORMATS[w]
    return 1 << (8 * w - 1) | ((1 << ebits) - 1) << fbits | 1 << (fbits - 1)


def quiet(b: int, w: int) -> int:
    return b | 1 << (FORMATS[w][1] - 1)


def _round_at(mant: int, shift: int, sign: int, rc: int) -> tuple[int, bool]:
    """mant >> shift rounded per rc; and whether it was inexact."""
    if shift <= 0:
        return mant << -shift, False
    q = mant >> shift
    r = mant - (q << shift)
    if not r:
        return q, False
    half = 1 << (shift - 1)
    if rc == 0:
        up = r > half or (r == half and q & 1)
    else:
        up = rc == (1 if sign else 2)
    return q + up, True


def round_pack(sign: int, mant: int, exp: int, w: int, rc: int, ftz: bool = False) -> tuple[int, int]:
    """Rounds (-1)**sign * mant * 2**exp (mant > 0) to width w once;
    returns (bits, flags)."""
    ebits, fbits = FORMATS[w]
    bias = (1 << (ebits - 1)) - 1
    emin = 1 - bias
    top = exp + mant.bit_length() - 1
    # tininess after rounding: round to the full precision, exponent unbounded
    qu, _ = _round_at(mant, top - fbits - exp, sign, rc)
    top_after = top + (qu >> (fbits + 1) != 0)
    tiny = top_after < emin
    lsb = max(top - fbits, emin - fbits)
    q, inexact = _round_at(mant, lsb - exp, sign, rc)
    if q >> (fbits + 1):
        q >>= 1
        lsb += 1
    flags = PE if inexact else 0
    s = sign << (8 * w - 1)
    if tiny and inexact:
        flags |= UE
    if tiny and ftz:
        return s, flags | UE | PE
    if q >> fbits:
        be = lsb + fbits + bias
        if be >= (1 << ebits) - 1:
            if rc == 0 or rc == (1 if sign else 2):
                return infinity(sign, w), OE | PE
            return s | (((1 << ebits) - 2) << fbits) | ((1 << fbits) - 1), OE | PE
        return s | be << fbits | (q & ((1 << fbits) - 1)), flags
    return s | q, flags
