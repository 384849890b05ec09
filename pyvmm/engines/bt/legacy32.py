"""Instructions that exist only outside 64-bit mode: pusha/pushad, popa/popad.

Both go through a helper that sees the whole register file. All stack
addresses are written before SP moves, so a fault in the middle leaves the
registers as they were (the stores already done are harmless: they are below
SP)."""

from __future__ import annotations

import iced_x86 as X

from .cpu import SS_
from .gen import Gen

M = X.Mnemonic
_SP = 4
_ORDER = (0, 1, 2, 3, 4, 5, 6, 7)  # eAX eCX eDX eBX eSP(original) eBP eSI eDI


def pusha(c, size: int) -> None:
    mask = c.sp_mask()
    sp = c.R[_SP] & mask
    vmask = (1 << (8 * size)) - 1
    values = [c.R[r] & vmask for r in _ORDER]
    for i, v in enumerate(values):
        c.wr(c.sb[SS_] + ((sp - size * (i + 1)) & mask), size, v)
    c.R[_SP] = (c.R[_SP] & ~mask) | ((sp - 8 * size) & mask)


def popa(c, size: int) -> None:
    mask = c.sp_mask()
    sp = c.R[_SP] & mask
    vmask = (1 << (8 * size)) - 1
    # Memory from low to high holds eDI eSI eBP (eSP, skipped) eBX eDX eCX eAX.
    values = [c.rd(c.sb[SS_] + ((sp + size * i) & mask), size) for i in range(8)]
    for i, reg in enumerate((7, 6, 5, None, 3, 2, 1, 0)):
        if reg is not None:
            c.R[reg] = (c.R[reg] & ~vmask) | values[i] if size == 2 else values[i]
    c.R[_SP] = (c.R[_SP] & ~mask) | ((sp + 8 * size) & mask)


def _pusha(g: Gen) -> None:
    size = 4 if g.ins.mnemonic == M.PUSHAD else 2
    g.helper(f"PUSHA(c, {size})", sets_flags=False)


def _popa(g: Gen) -> None:
    size = 4 if g.ins.mnemonic == M.POPAD else 2
    g.helper(f"POPA(c, {size})", sets_flags=False)


EMITTERS = {M.PUSHA: _pusha, M.PUSHAD: _pusha, M.POPA: _popa, M.POPAD: _popa}
EXPORTS = {"PUSHA": pusha, "POPA": popa}
