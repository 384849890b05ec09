"""Fast path for `rep stos`, `rep movs`, `rep ins` and `rep outs` going
forward (DF=0): whole runs inside one page of plain RAM are done as one
slice assignment instead of one MMU access per element (and, for ins/outs,
one Bus.read_many/write_many call, the bus looping over the elements).

`rep_fast(...)` and `rep_io(...)` do as much as it can and leaves the registers exactly
as the element-by-element loop would at that point, so string.py's loop
finishes the rest (page crossings by an element, code or page-table pages,
MMIO, overlapping moves).  Raises GuestFault (#PF/#GP) with the registers
precise, as the slow loop does."""

from __future__ import annotations

from .gen import MASK

PAGE = 0x1000
TICK_BYTES = 0x10000      # a long rep looks at the timers after each 64 KiB


def rep_tick(c, elements: int) -> None:
    """A rep string instruction did `elements` more iterations.  The CPU
    takes interrupts between iterations (SDM Vol. 1, 7.3.9.2 / REP), so
    when a timer is due the run stops there (pending): RCX/RSI/RDI stay
    partly advanced, RIP stays on the rep, and the dispatcher delivers.
    Under deterministic time each iteration takes as long as an
    instruction, so a timer can come due in the middle of a long rep."""
    clk, intc = c.clock, c.intc
    if clk is None or intc is None:
        return
    if clk.deterministic:
        clk.advance_ns(int(elements * clk.ns_per_insn))
    if clk.now_ns() >= intc.next_deadline_ns():
        c.pending = True


def rep_fast(c, op: str, size: int, am: int, es: int, src: int, lam: int) -> None:
    """op "stos" or "movs"; am: address-size mask; es/src: segment bases;
    lam: linear address mask."""
    R = c.R
    keep = 0 if am == 0xFFFFFFFF else ~am   # a 32-bit register write clears bits 63:32
    mmu = c.mmu
    done = 0
    while not c.pending:
        count = R[1] & am
        if count == 0:
            return
        if done >= TICK_BYTES:
            rep_tick(c, done // size)
            done = 0
            if c.pending:
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
        done += nb


def rep_io(c, op: str, size: int, am: int, es: int, src: int, lam: int) -> None:
    """op "ins" (port DX to ES:rDI) or "outs" (seg:rSI to port DX), in-page
    runs at a time.  The memory side is translated before the port is
    touched, so a fault leaves no element half done."""
    R = c.R
    keep = 0 if am == 0xFFFFFFFF else ~am   # a 32-bit register write clears bits 63:32
    mmu = c.mmu
    port = R[2] & 0xFFFF
    idx, base = (7, es) if op == "ins" else (6, src)
    done = 0
    while not c.pending:
        count = R[1] & am
        if count == 0:
            return
        if done >= TICK_BYTES:
            rep_tick(c, done // size)
            done = 0
            if c.pending:
                return
        off = R[idx] & am
        la = (base + off) & lam
        n = min(count, (PAGE - (la & 0xFFF)) // size, (am - off) // size + 1 if am != MASK[8] else count)
        if n <= 0:
            return                          # an element crosses the page: element by element
        nb = n * size
        if op == "ins":
            d = mmu.wspan(la)
            if d is None:
                return
            d[0][d[1]:d[1] + nb] = c.io.read_many(port, size, n)
        else:
            s = mmu.rspan(la)
            if s is None:
                return
            c.io.write_many(port, size, bytes(s[0][s[1]:s[1] + nb]))
        R[idx] = (R[idx] & keep) | ((off + nb) & am)
        R[1] = (R[1] & keep) | ((count - n) & am)
        done += nb
