"""Bit-manipulation instructions on general registers: BMI1 (andn, bextr,
blsi, blsmsk, blsr; tzcnt lives in alu.py), BMI2 (bzhi, mulx, pdep, pext,
rorx; shlx/shrx/sarx live in sysext.py) and ADX (adcx, adox).

BMI1/BMI2 are VEX-encoded but touch no vector state, so they run whatever
CR4.OSXSAVE says.  Flags follow the SDM; the ones it calls undefined come
out as AF = 0 and PF of the result (andn, bextr: the LOGIC kind) or 0
(blsi/blsmsk/blsr, bzhi), and bextr's SF from the result; the differential
tests clear undefined flags on both sides before comparing.

Generated code raises GuestFault only for memory operands (#PF/#GP)."""

from __future__ import annotations

import iced_x86 as X

from . import flags as F
from .gen import MASK, Gen

M = X.Mnemonic
Rg = X.Register


# -- pure helpers (exported into the translator's namespace) -------------------
def _szf(r: int, bits: int) -> int:
    """ZF and SF of a result."""
    return (F.ZF if r == 0 else 0) | (F.SF if r >> (bits - 1) & 1 else 0)


def blsx(kind: int, v: int, size: int) -> tuple[int, int]:
    """blsi (0), blsmsk (1), blsr (2) of v: (result, RAW flags word)."""
    bits, m = 8 * size, MASK[size]
    if kind == 0:
        r = v & -v & m
        return r, _szf(r, bits) | (F.CF if v else 0)
    if kind == 1:
        r = (v ^ (v - 1)) & m
        return r, (_szf(r, bits) & ~F.ZF) | (0 if v else F.CF)
    r = v & (v - 1) & m
    return r, _szf(r, bits) | (0 if v else F.CF)


def bextr(v: int, ctl: int, size: int) -> int:
    start, length = ctl & 0xFF, ctl >> 8 & 0xFF
    if start >= 8 * size:
        return 0
    return (v >> start) & ((1 << min(length, 8 * size)) - 1)


def bzhi(v: int, ctl: int, size: int) -> tuple[int, int]:
    """(result, RAW flags word): CF says the index was past the top bit."""
    bits, n = 8 * size, ctl & 0xFF
    r = v & ((1 << n) - 1) if n < bits else v
    return r, _szf(r, bits) | (F.CF if n > bits - 1 else 0)


def pdep(v: int, mask: int) -> int:
    """Scatters the low bits of v to the set bits of mask, lowest first."""
    r, k = 0, 0
    while mask:
        low = mask & -mask
        if v >> k & 1:
            r |= low
        k += 1
        mask ^= low
    return r


def pext(v: int, mask: int) -> int:
    """Gathers the bits of v under the set bits of mask to the low end."""
    r, k = 0, 0
    while mask:
        low = mask & -mask
        if v & low:
            r |= 1 << k
        k += 1
        mask ^= low
    return r


EXPORTS = {"BMI_BLSX": blsx, "BMI_BEXTR": bextr, "BMI_BZHI": bzhi, "BMI_PDEP": pdep, "BMI_PEXT": pext}


# -- emitters -------------------------------------------------------------------
def _andn(g: Gen) -> None:
    size = g.size(0)
    g.emit(f"t = ({g.read(1)} ^ {MASK[size]:#x}) & {g.read(2, size)}")
    g.write(0, "t")
    g.set_flags(F.LOGIC, size, "t")


def _bextr(g: Gen) -> None:
    size = g.size(0)
    g.emit(f"t = BMI_BEXTR({g.read(1, size)}, {g.read(2)}, {size})")
    g.write(0, "t")
    g.set_flags(F.LOGIC, size, "t")     # ZF; CF = OF = 0 (SF, AF, PF undefined)


_BLS = {M.BLSI: 0, M.BLSMSK: 1, M.BLSR: 2}


def _bls(g: Gen) -> None:
    size = g.size(0)
    g.emit(f"t, fw = BMI_BLSX({_BLS[g.ins.mnemonic]}, {g.read(1, size)}, {size})")
    g.write(0, "t")
    g.set_flags(F.RAW, size, "fw")


def _bzhi(g: Gen) -> None:
    size = g.size(0)
    g.emit(f"t, fw = BMI_BZHI({g.read(1, size)}, {g.read(2)}, {size})")
    g.write(0, "t")
    g.set_flags(F.RAW, size, "fw")


def _mulx(g: Gen) -> None:
    """hi:lo = rDX * src; op1 gets lo first, op0 hi (hi wins when both name
    the same register, as the SDM says)."""
    size = g.size(0)
    rdx = g.rreg(Rg.RDX if size == 8 else Rg.EDX)
    g.emit(f"t = {rdx} * {g.read(2, size)}")
    g.write(1, f"t & {MASK[size]:#x}")
    g.write(0, f"t >> {8 * size}")


def _pdep_pext(g: Gen) -> None:
    size = g.size(0)
    fn = "BMI_PDEP" if g.ins.mnemonic == M.PDEP else "BMI_PEXT"
    g.write(0, f"{fn}({g.read(1)}, {g.read(2, size)})")


def _rorx(g: Gen) -> None:
    size = g.size(0)
    bits = 8 * size
    k = g.ins.immediate(2) & (bits - 1)
    g.emit(f"x = {g.read(1, size)}")
    g.write(0, f"((x >> {k}) | (x << {bits - k})) & {MASK[size]:#x}" if k else "x")


def _adx(g: Gen) -> None:
    """adcx: CF in and out; adox: OF in and out; no other flag changes."""
    size = g.size(0)
    bits = 8 * size
    bit, shift = (F.CF, 0) if g.ins.mnemonic == M.ADCX else (F.OF, 11)
    g.emit(f"fw = {g.flags_expr()}")
    g.emit(f"t = {g.read(0)} + {g.read(1, size)} + (fw >> {shift} & 1)")
    g.write(0, f"t & {MASK[size]:#x}")
    g.set_flags(F.RAW, size, f"(fw & ~{bit:#x}) | (t >> {bits}) << {shift}")


EMITTERS = {M.ANDN: _andn, M.BEXTR: _bextr, M.BLSI: _bls, M.BLSMSK: _bls, M.BLSR: _bls,
            M.BZHI: _bzhi, M.MULX: _mulx, M.PDEP: _pdep_pext, M.PEXT: _pdep_pext, M.RORX: _rorx,
            M.ADCX: _adx, M.ADOX: _adx}
