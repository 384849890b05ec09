"""Runtime helpers called from translated code for the operations too long
to inline: multiply/divide, shifts and rotates, bit scans.

Each returns new values; flags come back as a RAW lazy state tuple
(fo, fr, fa, fb).  Raises GuestFault(#DE) for divide errors."""

from __future__ import annotations

from . import flags as F
from .faults import DE, GuestFault

MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
RAW = F.RAW * 4
PAR = F.PARITY


def sx(v: int, size: int) -> int:
    s = 1 << (size * 8 - 1)
    return (v ^ s) - s


def _szp(res: int, size: int) -> int:
    f = PAR[res & 0xFF]
    if res == 0:
        f |= F.ZF
    if res >> (size * 8 - 1):
        f |= F.SF
    return f


def mul(size: int, a: int, b: int) -> tuple[int, int, int]:
    """Unsigned a*b: (low, high, flags word)."""
    t = a * b
    bits = size * 8
    lo, hi = t & MASK[size], t >> bits
    f = _szp(lo, size) | (F.CF | F.OF if hi else 0)
    return lo, hi, f


def imul(size: int, a: int, b: int) -> tuple[int, int, int]:
    """Signed a*b: (low, high, flags word) with CF=OF=truncation."""
    t = sx(a, size) * sx(b, size)
    bits = size * 8
    lo = t & MASK[size]
    hi = (t >> bits) & MASK[size]
    f = _szp(lo, size) | (F.CF | F.OF if t != sx(lo, size) else 0)
    return lo, hi, f


def div(size: int, hi: int, lo: int, d: int) -> tuple[int, int]:
    """Unsigned (hi:lo)/d: (quotient, remainder). Raises #DE."""
    if d == 0:
        raise GuestFault(DE)
    n = (hi << (size * 8)) | lo
    q, r = divmod(n, d)
    if q > MASK[size]:
        raise GuestFault(DE)
    return q, r


def idiv(size: int, hi: int, lo: int, d: int) -> tuple[int, int]:
    """Signed (hi:lo)/d truncating toward zero. Raises #DE."""
    if d == 0:
        raise GuestFault(DE)
    bits = size * 8
    n = sx((hi << bits) | lo, size * 2)
    dv = sx(d, size)
    q = abs(n) // abs(dv)
    if (n < 0) != (dv < 0):
        q = -q
    r = n - q * dv
    if not -(1 << (bits - 1)) <= q < (1 << (bits - 1)):
        raise GuestFault(DE)
    return q & MASK[size], r & MASK[size]


def shift(kind: int, size: int, v: int, cnt: int, fo: int, fr: int, fa: int, fb: int,
          extra: int = 0) -> tuple[int, int, int, int, int]:
    """Shift/rotate kind 0=ROL 1=ROR 2=RCL 3=RCR 4=SHL 5=SHR 7=SAR 8=SHLD 9=SHRD.

    Returns (result, fo, fr, fa, fb); a zero count leaves everything as is."""
    bits = size * 8
    m = MASK[size]
    cnt &= 0x3F if size == 8 else 0x1F
    if cnt == 0:
        return v, fo, fr, fa, fb
    fw = F.flags_word(fo, fr, fa, fb)
    sign = 1 << (bits - 1)
    if kind == 4:  # SHL
        r = (v << cnt) & m
        cf = (v << cnt) >> bits & 1 if cnt <= bits else 0
        of = ((r >> (bits - 1)) ^ cf) & 1
        f = _szp(r, size) | cf | (F.OF if of else 0)
    elif kind == 5:  # SHR
        r = v >> cnt
        cf = (v >> (cnt - 1)) & 1
        f = _szp(r, size) | cf | (F.OF if (cnt == 1 and v & sign) or (cnt > 1 and v & sign) and False else 0)
        if v & sign and cnt == 1:
            f |= F.OF
    elif kind == 7:  # SAR
        s = sx(v, size)
        r = (s >> cnt) & m
        cf = (s >> (cnt - 1)) & 1 if cnt <= bits else (1 if s < 0 else 0)
        f = _szp(r, size) | cf
    elif kind in (0, 1):  # ROL / ROR
        c = cnt % bits
        r = ((v << c) | (v >> (bits - c))) & m if kind == 0 else ((v >> c) | (v << (bits - c))) & m
        if kind == 0:
            cf = r & 1
            of = (r >> (bits - 1) ^ cf) & 1
        else:
            cf = r >> (bits - 1) & 1
            of = ((r >> (bits - 1)) ^ (r >> (bits - 2))) & 1
        f = (fw & ~(F.CF | F.OF)) | cf | (F.OF if of else 0)
    elif kind in (2, 3):  # RCL / RCR through CF
        n = bits + 1
        c = cnt % n if size < 4 else cnt
        cin = fw & F.CF
        wide = (cin << bits) | v  # bit `bits` holds CF
        if c == 0:
            return v, fo, fr, fa, fb
        if kind == 2:
            wide = ((wide << c) | (wide >> (n - c))) & ((1 << n) - 1)
            r, cf = wide & m, wide >> bits
            of = (r >> (bits - 1) ^ cf) & 1
        else:
            of = ((v >> (bits - 1)) ^ cin) & 1
            wide = ((wide >> c) | (wide << (n - c))) & ((1 << n) - 1)
            r, cf = wide & m, wide >> bits
        f = (fw & ~(F.CF | F.OF)) | cf | (F.OF if of else 0)
    elif kind == 8:  # SHLD v, extra
        if cnt > bits:
            return v, fo, fr, fa, fb  # undefined result; leave unchanged
        wide = (v << bits) | extra
        t = wide << cnt
        r = (t >> bits) & m
        cf = (t >> (2 * bits)) & 1
        f = _szp(r, size) | cf | (F.OF if (r ^ v) & sign else 0)
    elif kind == 9:  # SHRD
        if cnt > bits:
            return v, fo, fr, fa, fb
        wide = (extra << bits) | v
        r = (wide >> cnt) & m
        cf = (wide >> (cnt - 1)) & 1
        f = _szp(r, size) | cf | (F.OF if (r ^ v) & sign else 0)
    else:
        raise ValueError(kind)
    return r, RAW, f, 0, 0


def bsf(size: int, v: int, old: int, fw: int) -> tuple[int, int]:
    if v == 0:
        return old, (fw & ~F.ARITH) | F.ZF
    return (v & -v).bit_length() - 1, fw & ~F.ARITH & ~F.ZF | 0


def bsr(size: int, v: int, old: int, fw: int) -> tuple[int, int]:
    if v == 0:
        return old, (fw & ~F.ARITH) | F.ZF
    return v.bit_length() - 1, fw & ~F.ARITH


def tzcnt(size: int, v: int) -> tuple[int, int]:
    bits = size * 8
    r = bits if v == 0 else (v & -v).bit_length() - 1
    return r, (F.CF if v == 0 else 0) | (F.ZF if r == 0 else 0)


def lzcnt(size: int, v: int) -> tuple[int, int]:
    bits = size * 8
    r = bits - v.bit_length()
    return r, (F.CF if v == 0 else 0) | (F.ZF if r == 0 else 0)


def popcnt(size: int, v: int) -> tuple[int, int]:
    return bin(v).count("1"), F.ZF if v == 0 else 0


def bswap(size: int, v: int) -> int:
    if size == 2:
        return 0  # undefined on hardware; real CPUs give 0 for the low word
    return int.from_bytes(v.to_bytes(size, "little"), "big")


EXPORTS = {"MUL": mul, "IMUL": imul, "DIV": div, "IDIV": idiv, "SHIFT": shift, "BSF": bsf,
           "BSR": bsr, "TZCNT": tzcnt, "LZCNT": lzcnt, "POPCNT": popcnt, "BSWAP": bswap, "SX": sx}
