"""Lazy condition flags.

The translator keeps the last flag-setting operation as four numbers
(fo, fr, fa, fb): `fo` = kind * 4 + size index, `fr` the unmasked result,
`fa`/`fb` the operands.  Flags are materialised only when something reads
them (jcc with an unknown producer, pushf, lahf, adc, ...).

Kinds:
  ADD   fr = fa + fb (+ carry-in), unmasked
  SUB   fr = fa - fb (- borrow), unmasked (negative means borrow)
  LOGIC fr = result; CF = OF = AF = 0
  INC   fr = fa + 1 unmasked, fb = CF before the instruction
  DEC   fr = fa - 1 unmasked, fb = CF before the instruction
  RAW   fr = the arithmetic flag bits themselves
  SHL, SHR, SAR  (a shift by a non-zero count) fr = result, fa = the value
        shifted, fb = the count; CF is the last bit shifted out, AF = 0, OF
        = MSB(result) ^ CF (SHL), MSB(value) for a 1-bit SHR, else 0
"""

from __future__ import annotations

CF, PF, AF, ZF, SF, TF, IF, DF, OF = 0x1, 0x4, 0x10, 0x40, 0x80, 0x100, 0x200, 0x400, 0x800
ARITH = CF | PF | AF | ZF | SF | OF
IOPL = 0x3000
NT, RF, VM, AC, VIF, VIP, ID = 0x4000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000

ADD, SUB, LOGIC, INC, DEC, RAW, SHL, SHR, SAR = 0, 1, 2, 3, 4, 5, 6, 7, 8
SIZE_INDEX = {1: 0, 2: 1, 4: 2, 8: 3}
BITS = (8, 16, 32, 64)
MASKS = (0xFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)

# PF is set when the low byte of the result has an even number of 1 bits.
PARITY = tuple(PF if bin(i).count("1") % 2 == 0 else 0 for i in range(256))

# Initial lazy state: all arithmetic flags clear.
CLEAR = (RAW * 4, 0, 0, 0)


def op(kind: int, size: int) -> int:
    """The `fo` code for a kind and an operand size in bytes."""
    return kind * 4 + SIZE_INDEX[size]


def flags_word(fo: int, fr: int, fa: int, fb: int) -> int:
    """The six arithmetic flags (CF PF AF ZF SF OF) of a lazy state."""
    kind, si = fo >> 2, fo & 3
    if kind == RAW:
        return fr & ARITH
    bits = BITS[si]
    res = fr & MASKS[si]
    f = PARITY[res & 0xFF]
    if res == 0:
        f |= ZF
    if res >> (bits - 1):
        f |= SF
    if kind == LOGIC:
        return f
    if kind >= SHL:
        cf = _shift_carry(kind, bits, fa, fb)
        if kind == SHL:
            of = (res >> (bits - 1) ^ cf) & 1
        else:
            of = fa >> (bits - 1) & 1 if kind == SHR and fb == 1 else 0
        return f | cf | (OF if of else 0)
    f |= (fa ^ fb ^ fr) & AF if kind <= SUB else (fa ^ 1 ^ fr) & AF
    if kind == ADD:
        if fr >> bits:
            f |= CF
        if ((fa ^ fr) & (fb ^ fr)) >> (bits - 1) & 1:
            f |= OF
    elif kind == SUB:
        if fr < 0:
            f |= CF
        if ((fa ^ fb) & (fa ^ fr)) >> (bits - 1) & 1:
            f |= OF
    elif kind == INC:
        f |= fb & CF
        if res == 1 << (bits - 1):
            f |= OF
    else:  # DEC
        f |= fb & CF
        if res == (1 << (bits - 1)) - 1:
            f |= OF
    return f


def _shift_carry(kind: int, bits: int, v: int, cnt: int) -> int:
    """The last bit a shift of `v` by `cnt` (> 0) moved out."""
    if kind == SHL:
        return (v << cnt) >> bits & 1      # 0 once cnt > bits
    if kind == SAR and v >> (bits - 1):
        v -= 1 << bits                     # sign-extended: a long SAR gives the sign
    return (v >> (cnt - 1)) & 1


def carry(fo: int, fr: int, fa: int, fb: int) -> int:
    """CF (0 or 1) of a lazy state, cheaper than flags_word."""
    kind = fo >> 2
    if kind >= SHL:
        return _shift_carry(kind, BITS[fo & 3], fa, fb)
    if kind == ADD:
        return (fr >> BITS[fo & 3]) & 1
    if kind == SUB:
        return 1 if fr < 0 else 0
    if kind == LOGIC:
        return 0
    return fb & 1 if kind != RAW else fr & 1


def test_cc(fw: int, cc: int) -> bool:
    """Evaluates condition code `cc` (0=O ... 15=G) on a flags word."""
    c2 = cc >> 1
    if c2 == 0:
        r = fw & OF
    elif c2 == 1:
        r = fw & CF
    elif c2 == 2:
        r = fw & ZF
    elif c2 == 3:
        r = fw & (CF | ZF)
    elif c2 == 4:
        r = fw & SF
    elif c2 == 5:
        r = fw & PF
    elif c2 == 6:
        r = bool(fw & SF) != bool(fw & OF)
    else:
        r = (fw & ZF) or (bool(fw & SF) != bool(fw & OF))
    r = bool(r)
    return (not r) if cc & 1 else r


def cond(cc: int, fo: int, fr: int, fa: int, fb: int) -> bool:
    """Condition `cc` of a lazy state (generic path)."""
    return test_cc(flags_word(fo, fr, fa, fb), cc)
