"""80-bit extended-precision images (sign, 15-bit exponent, 64-bit
significand with explicit J bit) as Python ints: classification, NaN
propagation and the one rounding step every exact x87 operation ends with.

Nothing here raises; exceptions are recorded in the FSW of the Fpu passed."""

from __future__ import annotations

from .x87state import C0, C1, C2, C3, IE, INDEFINITE80

M64 = 0xFFFFFFFFFFFFFFFF
BIAS = 16383
DE, ZE, OE, UE, PE = 0x2, 0x4, 0x8, 0x10, 0x20
SIGN = 1 << 79
INF80 = 0x7FFF << 64 | 1 << 63
ONE80 = BIAS << 64 | 1 << 63
E_MIN = 1 - BIAS - 63            # exponent of bit 0 of a denormal
REBIAS = 24576                   # 3 * 2^13: the exponent shift of an unmasked OE/UE result


def unpack(b: int) -> tuple[int, int, int]:
    """(sign, unbiased exponent of bit 0 of the significand, significand):
    value = (-1)**sign * mant * 2**e. Only for finite values."""
    exp, mant = b >> 64 & 0x7FFF, b & M64
    return b >> 79 & 1, (exp or 1) - BIAS - 63, mant


def is_nan(b: int) -> bool:
    return b >> 64 & 0x7FFF == 0x7FFF and b & (M64 >> 1) != 0


def is_inf(b: int) -> bool:
    return b >> 64 & 0x7FFF == 0x7FFF and b & (M64 >> 1) == 0


def is_zero(b: int) -> bool:
    return b & ((1 << 79) - 1) == 0


def quiet(b: int) -> int:
    return b | 1 << 62


def pack_round(f, sign: int, mant: int, e: int, bits: int = 64) -> int:
    """Rounds the exact value (-1)**sign * mant * 2**e to an 80-bit image
    under FCW.RC to `bits` significant bits (FCW.PC for the basic
    arithmetic); sets PE, C1 (rounded away from zero), OE and UE."""
    if mant == 0:
        return sign << 79
    rc = f.cw >> 10 & 3
    if ~f.cw & (OE | UE):
        r = _rebiased(f, sign, mant, e, bits, rc)
        if r is not None:
            return r
    # the last kept bit: `bits` below the leading one, and no lower than a
    # denormal's significand cut to `bits` at the fixed J-bit position
    drop = max(mant.bit_length() - bits, E_MIN + 64 - bits - e)
    up = inexact = False
    if drop > 0:
        rem = mant & ((1 << drop) - 1)
        half = 1 << (drop - 1)
        mant >>= drop
        e += drop
        inexact = rem != 0
        if inexact:
            if rc == 0:
                up = rem > half or rem == half and bool(mant & 1)
            else:
                up = rc == 1 and bool(sign) or rc == 2 and not sign
        if up:
            mant += 1
            if mant.bit_length() > bits:
                mant >>= 1
                e += 1
    if inexact:
        f.sw |= PE
        f.set_cc((f.sw & (C0 | C2 | C3)) | (C1 if up else 0))
    n = mant.bit_length()
    top = e + n - 1 + BIAS            # biased exponent of the leading bit
    if top >= 0x7FFF:
        f.sw |= OE | PE
        to_inf = rc == 0 or rc == 1 and sign or rc == 2 and not sign
        f.set_cc((f.sw & (C0 | C2 | C3)) | (C1 if to_inf else 0))
        return sign << 79 | (INF80 if to_inf else 0x7FFE << 64 | (M64 >> (64 - bits) << (64 - bits)))
    if top < 1:
        if inexact:
            f.sw |= UE
        return sign << 79 | mant << (e - E_MIN)      # denormal: exponent field 0
    return sign << 79 | top << 64 | mant << (64 - n)


def round_unbounded(sign: int, mant: int, e: int, bits: int, rc: int) -> tuple[int, int, bool, bool]:
    """(mant, e, inexact, rounded up): mant rounded to `bits` significant
    bits under rc as if the exponent had no bounds."""
    drop = mant.bit_length() - bits
    if drop <= 0:
        return mant, e, False, False
    rem, half = mant & ((1 << drop) - 1), 1 << (drop - 1)
    mant >>= drop
    e += drop
    if rem == 0:
        return mant, e, False, False
    up = (rem > half or rem == half and bool(mant & 1)) if rc == 0 else (rc == 1 and bool(sign) or
                                                                          rc == 2 and not sign)
    if up:
        mant += 1
        if mant.bit_length() > bits:
            mant >>= 1
            e += 1
    return mant, e, True, up


def _rebiased(f, sign: int, mant: int, e: int, bits: int, rc: int) -> int | None:
    """The register result under an unmasked overflow or underflow (SDM
    Vol. 1, 8.5.4-8.5.5): the significand rounded with an unbounded exponent,
    the exponent then brought back into range by -24576 (overflow) or
    +24576 (underflow), OE or UE set, with PE and C1 for the rounding.
    None when the result is in range or that exception is masked."""
    m, e2, inexact, up = round_unbounded(sign, mant, e, bits, rc)
    n = m.bit_length()
    top = e2 + n - 1 + BIAS
    if top >= 0x7FFF and not f.cw & OE:
        flag, top = OE, top - REBIAS
    elif top < 1 and not f.cw & UE:
        flag, top = UE, top + REBIAS
    else:
        return None
    if not 0 < top < 0x7FFF:
        # Too far even for the rebias (only FSCALE gets there): an infinity
        # or a zero whatever FCW.RC says, as the CPU gives.
        f.sw |= flag | PE
        f.set_cc((f.sw & (C0 | C2 | C3)) | (C1 if flag == OE else 0))
        return sign << 79 | (INF80 if flag == OE else 0)
    f.sw |= flag | (PE if inexact else 0)
    f.set_cc((f.sw & (C0 | C2 | C3)) | (C1 if up else 0))
    return sign << 79 | (top & 0x7FFF) << 64 | m << (64 - n)


def unsupported(b: int) -> bool:
    """Unnormals, pseudo-NaNs and pseudo-infinities: J bit clear, exponent not 0."""
    return b >> 64 & 0x7FFF != 0 and not b >> 63 & 1


def nan_result(f, *ops: int) -> int | None:
    """The indefinite NaN (IE) for an unsupported operand, else the propagated
    NaN when an operand is a NaN (IE for a signalling one), else None."""
    if all(0 < b >> 64 & 0x7FFF < 0x7FFF and b >> 63 & 1 for b in ops):
        return None         # the common case: normal numbers only
    if any(unsupported(b) for b in ops):
        f.sw |= IE
        return INDEFINITE80
    nans = [b for b in ops if is_nan(b)]
    if not nans:
        return None
    quiets = [b for b in nans if b >> 62 & 1]
    if len(quiets) < len(nans):
        f.sw |= IE          # a signalling one
    # a quiet NaN wins over a signalling one; between two, the larger
    # significand, and on a tie the positive one (as the EPYC hosts here do)
    return quiet(max(quiets or nans, key=lambda b: (b & M64, not b >> 79)))


def denormal(f, r: int, *ops: int) -> None:
    """DE for a denormal operand, unless the result is the invalid-operation
    NaN or another operand is a NaN (those take precedence)."""
    if any(not b >> 64 & 0x7FFF and b & M64 for b in ops) and r != INDEFINITE80 and \
            not any(is_nan(b) for b in ops):
        f.sw |= DE


