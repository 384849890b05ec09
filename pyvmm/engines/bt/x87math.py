"""x87 transcendental, remainder and scaling instructions on 80-bit values.

Like the basic arithmetic (x87arith.py), these work on the exact 80-bit
register images: FPREM/FPREM1/FSCALE/FXTRACT in exact integer
arithmetic, the transcendentals (FSIN, FCOS, FSINCOS, FPTAN, FPATAN, F2XM1,
FYL2X, FYL2XP1) through mpmath's multiprecision kernels at 128 bits, then
rounded once to a 64-bit significand under FCW.RC. Each sets PE on an
inexact result and C1 when it rounded away from zero, C2 as the SDM says
(argument out of range, incomplete remainder).

The CPU's transcendentals are not correctly rounded (SDM vol. 1, 8.3.10:
within 1 ulp); these are, so a result may differ from silicon in the last
bit of the 64-bit significand. An unmasked exception they flag raises #MF
at the next waiting instruction (x87state.x87_mf), but these still store
their masked response."""

from __future__ import annotations

import math

from mpmath import libmp

from .x87image import (BIAS, E_MIN, INF80, M64, ONE80, PE, SIGN, ZE, denormal, is_inf, is_zero,
                       nan_result, pack_round, unpack)
from .x87state import C0, C1, C2, C3, IE, INDEFINITE80, from80

WORK_PREC = 128
_RND = ("n", "f", "c", "d")      # FCW.RC -> mpmath rounding
PI66 = 0x3243F6A8885A308D3         # pi rounded to 66 bits, times 2**64
HALF_PI66 = libmp.from_man_exp(PI66, -65)
SERIES_BELOW = 16                # |x| < 2**-16: expm1/log1p by their series
TRIG_LIMIT = 63                  # |x| >= 2**63: out of range, C2 set


# -- 80-bit images ------------------------------------------------------------------
def _mpf(b: int):
    s, e, m = unpack(b)
    return libmp.from_man_exp(-m if s else m, e)


def _round_mpf(f, x) -> int:
    """The 80-bit image of an mpmath value computed at WORK_PREC bits."""
    s, man, exp, _ = x
    if not man:
        return s << 79
    return pack_round(f, s, man, exp)


def _round_fn(f, fn, smaller: bool | None = None) -> int:
    """The 80-bit image of fn(prec, rounding) rounded once under FCW.RC: the
    value rounded toward zero and away from zero at WORK_PREC bits bracket
    the exact one; when they differ a sticky bit below the first stands for
    the rest, so the final rounding (and PE, C1, UE) is exact.

    mpmath returns its argument for sin/tan/atan of a tiny one whatever the
    rounding asked for; `smaller` says on which side of such a value the true
    one lies (True: smaller in magnitude), so it still counts as inexact."""
    lo = fn(WORK_PREC, "d")
    s, man, exp, bc = lo
    if lo == fn(WORK_PREC, "u"):
        if smaller is None or not man:
            return pack_round(f, s, man, exp) if man else s << 79
        shift = max(66 - bc, exp - E_MIN + 2, 1)
        return pack_round(f, s, (man << shift) + (-1 if smaller else 1), exp - shift)
    if not man:      # |value| below the smallest WORK_PREC number: a sticky bit alone
        s, _, exp, bc = fn(WORK_PREC, "u")
    # the sticky bit goes below the last bit of any 64-bit or denormal result
    shift = max(66 - bc, exp - E_MIN + 2, 1)
    return pack_round(f, s, man << shift | 1, exp - shift)


def _push_overflows(f) -> bool:
    """For the forms that replace ST(0) and push (FSINCOS, FPTAN, FXTRACT):
    when the register below TOP is in use, the CPU signals a stack fault and
    leaves the indefinite NaN in both; C1 says overflow unless ST(0) was
    empty too (underflow)."""
    if f.empty[(f.top - 1) & 7]:
        return False
    under = f.empty[f.top]
    f.put(0, math.nan, INDEFINITE80)
    f.push(math.nan, INDEFINITE80)
    if under:
        f.sw &= ~C1
    return True


# -- transcendentals -------------------------------------------------------------------
def _operands(f, *idx: int) -> list[int] | None:
    """The images of ST(i) for i in idx; None after a stack underflow (an
    empty one among them: IE|SF, C1 cleared), whose result is the indefinite NaN."""
    if any(f.empty[(f.top + i) & 7] for i in idx):
        for i in idx:
            f.get(i)
        return None
    return [f.raw80(i) for i in idx]


def ftrig(f, op: str) -> None:
    """fsin/fcos/fptan/fsincos on ST(0)."""
    if op in ("fsincos", "fptan") and _push_overflows(f):
        return
    f.sw &= ~(C1 | C2)      # C0 and C3 are undefined: the CPU leaves them
    ops = _operands(f, 0)
    x = ops[0] if ops else INDEFINITE80
    nan = nan_result(f, x) if ops else INDEFINITE80
    if nan is None and is_inf(x):
        f.sw |= IE
        nan = INDEFINITE80
    if nan is not None:
        results = [nan, nan] if op in ("fsincos", "fptan") else [nan]
    elif (x >> 64 & 0x7FFF) - BIAS >= TRIG_LIMIT:
        f.sw |= C2
        return
    else:
        r, k = _reduce(x)
        sin = lambda p, rnd: _sin_k(r, k, p, rnd)  # noqa: E731
        cos = lambda p, rnd: _sin_k(r, k + 1, p, rnd)  # noqa: E731
        if is_zero(x):      # exact: sin and tan keep the zero's sign, cos is 1
            results = {"fsin": [x], "fcos": [ONE80], "fptan": [x, ONE80]}.get(op, [x, ONE80])
        elif op == "fsin":
            results = [_round_fn(f, sin, True)]
        elif op == "fcos":
            results = [_round_fn(f, cos, True)]
        elif op == "fptan":
            results = [_round_fn(f, lambda p, rnd: _tan_k(r, k, p, rnd), bool(k & 1)), ONE80]
        else:
            cos_image = _round_fn(f, cos, True)
            results = [_round_fn(f, sin, True), cos_image]     # C1 from the sine, as the CPU sets it
    denormal(f, results[0], x)
    f.put(0, from80(results[0]), results[0])
    if len(results) > 1:
        c1 = f.sw & C1
        f.push(from80(results[1]), results[1])
        f.sw |= c1


def _reduce(x: int) -> tuple:
    """x = r + k * PI66 / 2 with |r| <= PI66 / 4, exactly: the CPU reduces
    with a 66-bit pi (SDM vol. 1, 8.3.10), so large arguments land where
    silicon puts them rather than where the true pi would."""
    s, e, m = unpack(x)
    v = libmp.from_man_exp(-m if s else m, e)
    k = int(libmp.to_int(libmp.mpf_div(v, HALF_PI66, 80, "n"), "n"))
    return libmp.mpf_sub(v, libmp.mpf_mul(libmp.from_int(k), HALF_PI66), None), k


def _sin_k(r, k: int, prec: int, rnd: str):
    """sin(r + k * pi / 2) at prec bits."""
    q = k & 3
    v = libmp.mpf_sin(r, prec, rnd) if q in (0, 2) else libmp.mpf_cos(r, prec, rnd)
    return libmp.mpf_neg(v) if q >= 2 else v


def _tan_k(r, k: int, prec: int, rnd: str):
    """tan(r + k * pi / 2) at prec bits: tan(r), or -1 / tan(r) for odd k."""
    if not k & 1:
        return libmp.mpf_tan(r, prec, rnd)
    return libmp.mpf_neg(libmp.mpf_div(libmp.fone, libmp.mpf_tan(r, 2 * prec), prec, rnd))


def fpatan(f) -> None:
    """ST(1) = atan(ST(1) / ST(0)) with the quadrant of (ST(0), ST(1)); pop."""
    f.sw &= ~C1            # C0, C2, C3 are undefined: the CPU leaves them
    x, y = _operands(f, 0, 1) or (INDEFINITE80, INDEFINITE80)
    r = nan_result(f, y, x)
    if r is None and (is_zero(y) or is_inf(x)) and not is_inf(y) and not x >> 79:
        r = y & SIGN      # a signed zero, exactly
    if r is None:
        r = _round_fn(f, lambda p, rnd: _atan2(y, x, p, rnd), True)
    denormal(f, r, x, y)
    f.put(1, from80(r), r)
    f.pop()


def _atan2(y: int, x: int, prec: int, rnd: str):
    """atan2 of two 80-bit values; infinities and signed zeros give the
    multiples of pi / 4 that IEEE 754 (and the CPU) give."""
    if is_inf(y) or is_inf(x) or is_zero(y) or is_zero(x):
        if is_inf(y):
            quarters = 2 if not is_inf(x) else 1 if not x >> 79 else 3
        elif is_zero(y) or is_inf(x):
            quarters = 0 if not x >> 79 else 4
        else:
            quarters = 2      # x is a zero, y finite and not zero
        v = libmp.mpf_shift(libmp.mpf_mul(libmp.from_int(quarters), libmp.mpf_pi(prec + 8, rnd), prec + 8), -2)
        return libmp.mpf_pos(libmp.mpf_neg(v) if y >> 79 else v, prec, rnd)
    return libmp.mpf_atan2(_special_mpf(y), _special_mpf(x), prec, rnd)


def _special_mpf(b: int):
    if is_inf(b):
        return libmp.fninf if b >> 79 else libmp.finf
    if is_zero(b):
        return libmp.fnzero if b >> 79 else libmp.fzero
    return _mpf(b)


def f2xm1(f) -> None:
    f.sw &= ~C1            # C0, C2, C3 are undefined: the CPU leaves them
    x = (_operands(f, 0) or [INDEFINITE80])[0]
    r = nan_result(f, x)
    if r is None:
        if is_inf(x):
            r = x if not x >> 79 else SIGN | ONE80
        elif is_zero(x):
            r = x
        elif x & ~SIGN > ONE80:
            # |x| > 1 is outside the domain (the SDM leaves the result
            # undefined): the EPYC hosts here return x and set PE
            r = x
            f.sw |= PE
        elif x == SIGN | ONE80:
            r = SIGN | ONE80 - (1 << 64)      # -0.5, which the CPU too flags inexact
            f.sw |= PE
        else:
            r = _round_fn(f, lambda p, rnd: _expm1(libmp.mpf_mul(_mpf(x), libmp.mpf_ln2(2 * p), 2 * p), p, rnd))
    denormal(f, r, x)
    f.put(0, from80(r), r)


def _expm1(t, prec: int, rnd: str):
    """e**t - 1 at prec bits, without the cancellation of exp(t) - 1 near 0."""
    if libmp.mpf_abs(t)[2] + libmp.mpf_abs(t)[3] > -SERIES_BELOW:
        return libmp.mpf_sub(libmp.mpf_exp(t, 2 * prec), libmp.fone, prec, rnd)
    total, term, n = t, t, 1
    while True:       # t + t**2/2! + ...: each term is 2**SERIES_BELOW smaller
        n += 1
        term = libmp.mpf_div(libmp.mpf_mul(term, t, 2 * prec), libmp.from_int(n), 2 * prec)
        if term[1] == 0 or term[2] + term[3] < total[2] + total[3] - 2 * prec:
            return libmp.mpf_pos(total, prec, rnd)
        total = libmp.mpf_add(total, term, 2 * prec)


def _log1p(x, prec: int):
    """ln(1 + x) at prec bits for an exact x, without cancellation near 0."""
    if x[1] == 0 or x[2] + x[3] > -SERIES_BELOW:
        return libmp.mpf_log(libmp.mpf_add(x, libmp.fone, 0), prec)
    total, power, n = x, x, 1
    while True:       # x - x**2/2 + x**3/3 - ...
        n += 1
        power = libmp.mpf_mul(power, libmp.mpf_neg(x), 2 * prec)
        term = libmp.mpf_div(power, libmp.from_int(n), 2 * prec)
        if term[1] == 0 or term[2] + term[3] < total[2] + total[3] - 2 * prec:
            return libmp.mpf_pos(total, prec)
        total = libmp.mpf_add(total, term, 2 * prec)


def fyl2x(f, plus1: bool) -> None:
    """ST(1) = ST(1) * log2(ST(0) [+ 1]); pop."""
    f.sw &= ~C1            # C0, C2, C3 are undefined: the CPU leaves them
    x, y = _operands(f, 0, 1) or (INDEFINITE80, INDEFINITE80)
    r = nan_result(f, x, y)
    if r is None:
        ze = f.sw & ZE
        r = _yl2x_value(f, x, y, plus1)
        if ze or not f.sw & ZE:     # a division by zero takes precedence over DE
            denormal(f, r, x, y)
    f.put(1, from80(r), r)
    f.pop()


def _yl2x_value(f, x: int, y: int, plus1: bool) -> int:
    xv, yv = _special_mpf(x), _special_mpf(y)
    if plus1:
        xv = libmp.mpf_add(xv, libmp.fone, 0)   # exact
    ysign = y >> 79 & 1
    if libmp.mpf_lt(xv, libmp.fzero) or is_inf(x) and x >> 79:
        f.sw |= IE
        return INDEFINITE80
    if xv == libmp.fzero or xv == libmp.fnzero:
        if is_zero(y):
            f.sw |= IE
            return INDEFINITE80
        if is_inf(y):
            return (ysign ^ 1) << 79 | INF80
        f.sw |= ZE
        return (ysign ^ 1) << 79 | INF80
    if is_inf(x):
        if is_zero(y):
            f.sw |= IE
            return INDEFINITE80
        return ysign << 79 | INF80
    if x & M64 == 1 << 63 and not plus1:     # a power of two: log2 is its exponent, y * it exact
        lg = libmp.from_int((x >> 64 & 0x7FFF) - BIAS)
        if is_inf(y):
            return _inf_times(f, ysign, lg)
        if not is_zero(y):
            f.sw |= PE      # the CPU flags even these exact products inexact
        return _round_mpf(f, libmp.mpf_mul(yv, lg))
    ln = _log1p(_special_mpf(x), 2 * WORK_PREC) if plus1 else libmp.mpf_log(xv, 2 * WORK_PREC)
    lg = libmp.mpf_div(ln, libmp.mpf_ln2(2 * WORK_PREC), 2 * WORK_PREC)
    if is_inf(y):
        return _inf_times(f, ysign, lg)
    return _round_fn(f, lambda p, rnd: libmp.mpf_mul(yv, lg, p, rnd))


def _inf_times(f, ysign: int, lg) -> int:
    if lg[1] == 0:
        f.sw |= IE
        return INDEFINITE80
    return (ysign ^ lg[0]) << 79 | INF80


# -- remainder, scale, extract (exact) -----------------------------------------------------
def fprem(f, ieee: bool) -> None:
    """ST(0) = partial remainder of ST(0) / ST(1); C2 set when incomplete,
    else the quotient's low bits in C0 (bit 2), C3 (bit 1), C1 (bit 0)."""
    ops = _operands(f, 0, 1)
    if ops is None:
        f.sw &= ~(C1 | C2)      # C0 and C3 stay, as on the CPU
        f.put(0, math.nan, INDEFINITE80)
        return
    a, b = ops
    r = nan_result(f, a, b)
    if r is None and (is_inf(a) or is_zero(b)):
        f.sw |= IE
        r = INDEFINITE80
    if r is None and (is_inf(b) or is_zero(a)):
        f.set_cc(0)
        denormal(f, 0, a, b)
        return
    if r is not None:
        f.sw &= ~(C1 | C2)
        f.put(0, from80(r), r)
        return
    sa, ea, ma = unpack(a)
    _, eb, mb = unpack(b)
    d = (ea + ma.bit_length()) - (eb + mb.bit_length())
    if d >= 64:
        # incomplete: reduce by a multiple of b * 2**(d - n), n in 32..63; the
        # EPYC hosts here take n = 32 + (d - 32) % 32 (the SDM leaves it open)
        shift = (d - 32) // 32 * 32
        na, nb = ma << max(ea - eb - shift, 0), mb << max(eb + shift - ea, 0)
        q = na // nb
        rem = na - q * nb
        re_ = min(ea, eb + shift)
        f.set_cc(C2)
    else:
        na, nb = ma << max(ea - eb, 0), mb << max(eb - ea, 0)
        q, rem = divmod(na, nb)
        if ieee and (2 * rem > nb or 2 * rem == nb and q & 1):
            q += 1
            rem -= nb
        re_ = min(ea, eb)
        f.set_cc((C0 if q & 4 else 0) | (C3 if q & 2 else 0) | (C1 if q & 1 else 0))
    sign = sa ^ (1 if rem < 0 else 0)
    if rem == 0:
        r = sa << 79
    else:
        cc = f.sw & (C0 | C1 | C2 | C3)
        r = pack_round(f, sign, abs(rem), re_)
        f.set_cc(cc)
    denormal(f, r, a, b)
    f.put(0, from80(r), r)


def fscale(f) -> None:
    """ST(0) = ST(0) * 2**trunc(ST(1))."""
    f.sw &= ~C1            # C0, C2, C3 are undefined: the CPU leaves them
    a, b = _operands(f, 0, 1) or (INDEFINITE80, INDEFINITE80)
    r = nan_result(f, a, b)
    if r is None:
        if is_inf(b):
            if b >> 79 and is_inf(a) or not b >> 79 and is_zero(a):
                f.sw |= IE
                r = INDEFINITE80
            elif is_zero(a) or is_inf(a):
                r = a
            else:
                r = (a & SIGN) | (0 if b >> 79 else INF80)
        elif is_zero(a) or is_inf(a):
            r = a
        else:
            sb, eb, mb = unpack(b)
            n = mb >> -eb if eb < 0 else mb << eb
            n = min(n, 1 << 20)
            sa, ea, ma = unpack(a)
            r = pack_round(f, sa, ma, ea + (-n if sb else n))
    denormal(f, r, a, b)
    f.put(0, from80(r), r)


def fxtract(f) -> None:
    """ST(0) = exponent of ST(0) as a real; then push its significand."""
    if _push_overflows(f):
        return
    f.sw &= ~C1            # C0, C2, C3 are undefined: the CPU leaves them
    a = (_operands(f, 0) or [INDEFINITE80])[0]
    r = nan_result(f, a)
    if r is not None:
        exp = sig = r
    elif is_zero(a):
        f.sw |= ZE
        exp, sig = SIGN | INF80, a
    elif is_inf(a):
        exp, sig = INF80, a
    else:
        s, e, m = unpack(a)
        k = m.bit_length()
        unbiased = e + k - 1
        exp = pack_round(f, 1 if unbiased < 0 else 0, abs(unbiased), 0)
        sig = s << 79 | BIAS << 64 | m << (64 - k)
    denormal(f, exp, a)
    f.put(0, from80(exp), exp)
    f.push(from80(sig), sig)


EXPORTS = {"FTRIG": ftrig, "FPATAN": fpatan, "F2XM1": f2xm1, "FYL2X": fyl2x, "FPREM": fprem,
           "FSCALE": fscale, "FXTRACT": fxtract}
