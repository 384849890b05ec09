"""SSE4.2 packed string compares: pcmpestri/pcmpestrm (explicit lengths in
rAX and rDX) and pcmpistri/pcmpistrm (lengths end at the first zero
element), as the SDM's "imm8 control byte" section describes them.

imm8: bits 1:0 the element format (unsigned/signed, bytes/words), 3:2 the
aggregation (equal any, ranges, equal each, equal ordered), 5:4 the
polarity, bit 6 which index (lowest/highest) or which mask form
(bits/expanded elements).  The result goes to ECX (index forms) or XMM0
(mask forms); CF, ZF, SF and OF report it, AF and PF are cleared.

The 16-byte memory operand needs no alignment (simd.UNALIGNED_OK).
Generated code raises GuestFault as described in simd.py."""

from __future__ import annotations

import iced_x86 as X

from . import flags as F
from .gen import Gen
from .simd import check_sse, lanes, unlanes, xread, xreg

M = X.Mnemonic
EQUAL_ANY, RANGES, EQUAL_EACH, EQUAL_ORDERED = 0, 1, 2, 3


def elements(v: int, imm: int) -> tuple:
    """The 16 bytes or 8 words of v, signed when imm says so."""
    return lanes(v, 2 if imm & 1 else 1, bool(imm & 2))


def implicit_length(e: tuple) -> int:
    """Index of the first zero element (the count of elements if none)."""
    return e.index(0) if 0 in e else len(e)


def explicit_length(r: int, size: int, imm: int) -> int:
    """|r| (a signed register of `size` bytes) saturated to the element count."""
    n = 8 if imm & 1 else 16
    bits = 8 * size
    r &= (1 << bits) - 1
    if r >> (bits - 1):
        r = (1 << bits) - r
    return min(r, n)


def intres2(x: tuple, y: tuple, la: int, lb: int, imm: int) -> int:
    """The SDM's IntRes2 for the elements x (first operand) and y (second):
    one bit per element of y."""
    n = len(x)
    agg = imm >> 2 & 3
    r = 0
    if agg == EQUAL_ANY:
        needles = set(x[:la])
        for i in range(lb):
            if y[i] in needles:
                r |= 1 << i
    elif agg == RANGES:
        for i in range(lb):
            for j in range(0, la - 1, 2):
                if x[j] <= y[i] <= x[j + 1]:
                    r |= 1 << i
                    break
    elif agg == EQUAL_EACH:
        for i in range(min(la, lb)):
            if x[i] == y[i]:
                r |= 1 << i
        r |= ((1 << n) - 1) ^ ((1 << max(la, lb)) - 1)     # both invalid: true
    else:   # EQUAL_ORDERED: does the needle a[:la] start at element i of b?
        for i in range(n):
            ok = True
            for k in range(n - i):
                if k >= la:
                    break                       # past the needle: true from here on
                if i + k >= lb or x[k] != y[i + k]:
                    ok = False
                    break
            if ok:
                r |= 1 << i
    full = (1 << n) - 1
    pol = imm >> 4 & 3
    if pol == 1:
        r ^= full
    elif pol == 3:
        r ^= (1 << lb) - 1
    return r


def flags(res: int, la: int, lb: int, imm: int) -> int:
    """RAW flags word: CF result non-zero, ZF b ends early, SF a ends early, OF bit 0."""
    n = 8 if imm & 1 else 16
    return ((F.CF if res else 0) | (F.ZF if lb < n else 0) | (F.SF if la < n else 0)
            | (F.OF if res & 1 else 0))


def index(res: int, imm: int) -> int:
    if not res:
        return 8 if imm & 1 else 16
    return res.bit_length() - 1 if imm & 0x40 else (res & -res).bit_length() - 1


def mask(res: int, imm: int) -> int:
    if not imm & 0x40:
        return res
    w = 2 if imm & 1 else 1
    return unlanes([-(res >> i & 1) for i in range(16 // w)], w)


def pcmpstr(a: int, b: int, la: int, lb: int, imm: int, want_mask: bool) -> tuple[int, int]:
    """(ECX index or XMM0 mask, RAW flags word); la = lb = -1 for the
    implicit lengths."""
    x, y = elements(a, imm), elements(b, imm)
    if la < 0:
        la, lb = implicit_length(x), implicit_length(y)
    res = intres2(x, y, la, lb, imm)
    return (mask(res, imm) if want_mask else index(res, imm)), flags(res, la, lb, imm)


EXPORTS = {"S42_PCMPSTR": pcmpstr, "S42_ELEN": explicit_length}

_FORMS = {M.PCMPESTRI: (True, False, 4), M.PCMPESTRI64: (True, False, 8),
          M.PCMPESTRM: (True, True, 4), M.PCMPESTRM64: (True, True, 8),
          M.PCMPISTRI: (False, False, 4), M.PCMPISTRM: (False, True, 4)}


def _pcmpstr(g: Gen) -> None:
    explicit, want_mask, size = _FORMS[g.ins.mnemonic]
    check_sse(g)
    imm = g.ins.immediate(2) & 0xFF
    a = f"c.xmm[{xreg(g, 0)}]"
    g.emit(f"y = {xread(g, 1)}")
    if explicit:
        rax, rdx = (g.reg(0), g.reg(2))
        g.emit(f"la = S42_ELEN({rax}, {size}, {imm}); lb = S42_ELEN({rdx}, {size}, {imm})")
    else:
        g.emit("la = lb = -1")
    g.emit(f"t, fw = S42_PCMPSTR({a}, y, la, lb, {imm}, {want_mask})")
    if want_mask:
        g.emit("c.xmm[0] = t")
    else:
        g.emit(f"{g.reg(1)} = t")
    g.set_flags(F.RAW, 8, "fw")


EMITTERS = {m: _pcmpstr for m in _FORMS}
