"""Fast path for `rep stos` and `rep movs` going forward (DF=0): whole runs
inside one page of plain RAM are done as one slice assignment instead of
one MMU access per element.

`rep_fast(...)` does as much as it can and leaves the registers exactly
as the element-by-element loop would at that point, so string.py's loop
finishes the rest (page crossings by an element, code or page-table pages,
MMIO, overlapping moves).  Raises GuestFault (#PF/#GP) with the registers
precise, as the slow loop does."""

from __future__ import annotations

from .gen import MASK

PAGE = 0x1000


def rep_fast(c, op: str, size: int, am: int, es: int, src: int, lam: int) -> None:
    """op "stos" or "movs"; am: address-size mask; es/src: segment bases;
    lam: linear address mask."""
    R = c.R
    keep = ~am
    mmu = c.mmu
    while not c.pending:
        count = R[1] & am
        if count == 0:
            return
        di = R[7] & am
        dla = (es + di) & lam
        n = min(count, (PAGE - (dla & 0xFFF)) // size, (am - di) // size + 1 if am != MASK[8] else count)
        if op == "movs":
            si = R[6] & am
            sla = (src + si) & lam
            n = min(n, (PAGE - (sla & 0xFFF)) // size)
            if am != MASK[8]:
                n = min(n, (am - si) // size + 1)
        if n <= 0:
            return
        nb = n * size
        if op == "movs":
            s = mmu.rspan(sla)
            if s is None:
                return
            d = mmu.wspan(dla)
            if d is None:
                return
            if s[0] is d[0] and 0 < d[1] - s[1] < nb:
                return                      # overlapping forward copy: element semantics
            d[0][d[1]:d[1] + nb] = s[0][s[1]:s[1] + nb]
            R[6] = (R[6] & keep) | ((si + nb) & am)
        else:
            d = mmu.wspan(dla)
            if d is None:
                return
            d[0][d[1]:d[1] + nb] = (R[0] & MASK[size]).to_bytes(size, "little") * n
        R[7] = (R[7] & keep) | ((di + nb) & am)
        R[1] = (R[1] & keep) | ((count - n) & am)
