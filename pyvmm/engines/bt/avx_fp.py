"""VCMPPS/PD/SS/SD: the VEX compares take all 32 predicates of imm8[4:0]
(the legacy forms only the first eight).  Predicates 16-31 repeat 0-15
with the signalling and quiet behaviour swapped, which only changes the
IE flag (left alone here, as the legacy SSE compares do).

Generated code raises GuestFault as described in vex.py."""

from __future__ import annotations

import iced_x86 as X

from .gen import Gen
from .simd import M128
from .ssefp import _nan, to_float
from .vex import check_avx, vread, vreg, vwrite

M = X.Mnemonic


def _holds(a: int, b: int, w: int, pred: int) -> bool:
    """Predicate pred & 15 on one element pair (SDM Table "Comparison Predicate for VCMPPD")."""
    p = pred & 15
    if _nan(a, w) or _nan(b, w):
        return p in (3, 4, 5, 6, 8, 9, 10, 15)
    x, y = to_float(a, w), to_float(b, w)
    return (x == y, x < y, x <= y, False, x != y, not x < y, not x <= y, True,
            x == y, x < y, x <= y, False, x != y, x >= y, x > y, True)[p]


def vcmp(a: int, b: int, w: int, pred: int, n: int) -> int:
    """n elements of width w compared; all-ones where the predicate holds."""
    bits = 8 * w
    m = (1 << bits) - 1
    out = 0
    for i in range(n):
        sh = bits * i
        if _holds(a >> sh & m, b >> sh & m, w, pred):
            out |= m << sh
    return out


EXPORTS = {"AVX_VCMP": vcmp}
_FORMS = {M.VCMPPS: (4, False), M.VCMPPD: (8, False), M.VCMPSS: (4, True), M.VCMPSD: (8, True)}


def _vcmp(g: Gen) -> None:
    w, scalar = _FORMS[g.ins.mnemonic]
    check_avx(g)
    _, width = vreg(g, 0)
    a = vread(g, 1)
    b = vread(g, 2, w if scalar else None)
    pred = g.ins.immediate(3) & 0x1F
    if scalar:
        g.emit(f"_a = {a}")
        keep = M128 ^ ((1 << (8 * w)) - 1)
        vwrite(g, 0, f"(_a & {keep:#x}) | AVX_VCMP(_a, {b}, {w}, {pred}, 1)")
    else:
        vwrite(g, 0, f"AVX_VCMP({a}, {b}, {w}, {pred}, {width // w})")


EMITTERS = {m: _vcmp for m in _FORMS}
