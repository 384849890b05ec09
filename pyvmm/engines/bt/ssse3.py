"""SSE3 and SSSE3 (legacy 128-bit encodings): addsub/hadd/hsub, the
movddup/movshdup/movsldup duplicates, lddqu, and the SSSE3 integer set
(pshufb, palignr, phadd*/phsub*, pmaddubsw, pmulhrsw, psign*, pabs*).

Floating-point lanes go through ssearith under MXCSR (rounding, DAZ/FTZ,
flags, unmasked #XM/#UD), as the SSE arithmetic does.  The MMX-register forms of SSSE3 run the same
helpers on 64-bit operands (zero-extended; the lane-wise ones need nothing
else, pshufb/palignr/phadd*/phsub* take the width).

Generated code raises GuestFault as described in simd.py."""

from __future__ import annotations

import iced_x86 as X

from .gen import Gen, Unsupported
from .simd import CR0_EM, CR0_TS, check_sse, lanes, unlanes, xread, xreg
from .ssearith import ADD, SUB, lanes_mx

M = X.Mnemonic
Rg = X.Register
M64 = 0xFFFFFFFFFFFFFFFF


# -- SSE3 floating point (under MXCSR: ssearith.lanes_mx) ------------------------
def addsub(c, d: int, s: int, w: int) -> int:
    """Even lanes subtract, odd lanes add."""
    x, y = lanes(d, w), lanes(s, w)
    return unlanes(lanes_mx(c, [(SUB if i % 2 == 0 else ADD, x[i], y[i]) for i in range(len(x))], w), w)


def hfp(c, op: int, d: int, s: int, w: int) -> int:
    """haddp*/hsubp*: adjacent pairs of d, then of s."""
    v = lanes(d, w) + lanes(s, w)
    return unlanes(lanes_mx(c, [(op, v[i], v[i + 1]) for i in range(0, len(v), 2)], w), w)


# -- SSSE3 integer ------------------------------------------------------------------
def _sat16(v: int) -> int:
    return -32768 if v < -32768 else 32767 if v > 32767 else v


def pshufb(d: int, s: int, n: int = 16) -> int:
    """n = 16 (xmm) or 8 (mm: the index takes 3 bits)."""
    x, sel = d.to_bytes(16, "little"), s.to_bytes(16, "little")[:n]
    return int.from_bytes(bytes(0 if k & 0x80 else x[k & (n - 1)] for k in sel), "little")


def palignr(d: int, s: int, imm: int, n: int = 16) -> int:
    return ((d << (8 * n) | s) >> (8 * imm)) & ((1 << (8 * n)) - 1)


def phorizontal(d: int, s: int, w: int, sub: bool, sat: bool, n: int = 16) -> int:
    k = n // w
    v = lanes(d, w, True)[:k] + lanes(s, w, True)[:k]
    out = [v[i] - v[i + 1] if sub else v[i] + v[i + 1] for i in range(0, len(v), 2)]
    if sat:
        out = [_sat16(x) for x in out]
    return unlanes(out + [0] * (16 // w - k), w)


def pmaddubsw(d: int, s: int) -> int:
    x, y = lanes(d, 1), lanes(s, 1, True)
    return unlanes([_sat16(x[i] * y[i] + x[i + 1] * y[i + 1]) for i in range(0, 16, 2)], 2)


def pmulhrsw(d: int, s: int) -> int:
    x, y = lanes(d, 2, True), lanes(s, 2, True)
    return unlanes([((a * b >> 14) + 1) >> 1 for a, b in zip(x, y)], 2)


def psign(d: int, s: int, w: int) -> int:
    x, y = lanes(d, w), lanes(s, w, True)
    return unlanes([0 if b == 0 else -a if b < 0 else a for a, b in zip(x, y)], w)


def pabs(s: int, w: int) -> int:
    return unlanes([abs(v) for v in lanes(s, w, True)], w)


EXPORTS = {"S3_ADDSUB": addsub, "S3_HFP": hfp, "S3_PSHUFB": pshufb, "S3_PALIGNR": palignr,
           "S3_PHORIZ": phorizontal, "S3_PMADDUBSW": pmaddubsw, "S3_PMULHRSW": pmulhrsw,
           "S3_PSIGN": psign, "S3_PABS": pabs}


# -- emitters ---------------------------------------------------------------------------
def _is_mm(g: Gen, i: int) -> bool:
    return g.is_reg(i) and Rg.MM0 <= g.ins.op_register(i) <= Rg.MM7


def _set(g: Gen, expr_of) -> None:
    """c.xmm[d] = expr_of(d_expr, src_expr, width) for an xmm, xmm/m128
    form; the MMX form (mm, mm/m64) goes through the x87/MMX state as
    mmx.py keeps it: CR0.EM/TS checked, the source read, then TOP = 0 and
    all tags valid (MMX(c)), then the result stored."""
    if not _is_mm(g, 0):
        check_sse(g)
        d = xreg(g, 0)
        s = xread(g, 1)
        g.emit(f"c.xmm[{d}] = {expr_of(f'c.xmm[{d}]', s, 16)}")
        return
    g.fault()
    g.bind("c")
    g.emit(f"if c.cr0 & {CR0_EM | CR0_TS:#x}: MMX_TRAP(c)")
    d = g.ins.op0_register - Rg.MM0
    g.emit("f = FPU(c)")
    if _is_mm(g, 1):
        s = f"MMG(f, {g.ins.op1_register - Rg.MM0})"
    elif g.is_mem(1):
        g.addr()
        g.load("m1", 8)
        s = "m1"
    else:
        raise Unsupported("operand kind")
    g.emit(f"t = {expr_of(f'MMG(f, {d})', s, 8)} & {M64:#x}")
    g.emit("f = MMX(c)")
    g.emit(f"MMS(f, {d}, t)")


_W = {M.ADDSUBPS: 4, M.ADDSUBPD: 8, M.HADDPS: 4, M.HADDPD: 8, M.HSUBPS: 4, M.HSUBPD: 8}


def _addsub(g: Gen) -> None:
    w = _W[g.ins.mnemonic]
    _set(g, lambda d, s, n: f"S3_ADDSUB(c, {d}, {s}, {w})")


def _hfp(g: Gen) -> None:
    m = g.ins.mnemonic
    op = SUB if m in (M.HSUBPS, M.HSUBPD) else ADD
    _set(g, lambda d, s, n: f"S3_HFP(c, {op}, {d}, {s}, {_W[m]})")


def _dup(g: Gen) -> None:
    check_sse(g)
    d = xreg(g, 0)
    m = g.ins.mnemonic
    if m == M.MOVDDUP:
        g.emit(f"t = {xread(g, 1, 8)} & {M64:#x}")
        g.emit(f"c.xmm[{d}] = t | t << 64")
        return
    g.emit(f"t = {xread(g, 1)}")
    keep = 0xFFFFFFFF00000000FFFFFFFF00000000 if m == M.MOVSHDUP else 0x00000000FFFFFFFF00000000FFFFFFFF
    shift = ">> 32" if m == M.MOVSHDUP else "<< 32"
    g.emit(f"t &= {keep:#x}")
    g.emit(f"c.xmm[{d}] = t | (t {shift})")


def _load(g: Gen) -> None:
    """lddqu: a 16-byte load with no alignment check."""
    check_sse(g)
    if not g.is_mem(1):
        raise Unsupported("register source")
    d = xreg(g, 0)
    g.emit(f"c.xmm[{d}] = {xread(g, 1)}")


_HORIZ = {M.PHADDW: (2, False, False), M.PHADDD: (4, False, False), M.PHADDSW: (2, False, True),
          M.PHSUBW: (2, True, False), M.PHSUBD: (4, True, False), M.PHSUBSW: (2, True, True)}


def _horiz(g: Gen) -> None:
    w, sub, sat = _HORIZ[g.ins.mnemonic]
    _set(g, lambda d, s, n: f"S3_PHORIZ({d}, {s}, {w}, {sub}, {sat}, {n})")


_SIGN = {M.PSIGNB: 1, M.PSIGNW: 2, M.PSIGND: 4}
_ABS = {M.PABSB: 1, M.PABSW: 2, M.PABSD: 4}


def _ssse3(g: Gen) -> None:
    m = g.ins.mnemonic
    if m == M.PSHUFB:
        _set(g, lambda d, s, n: f"S3_PSHUFB({d}, {s}, {n})")
    elif m == M.PALIGNR:
        imm = g.ins.immediate(2) & 0xFF
        _set(g, lambda d, s, n: f"S3_PALIGNR({d}, {s}, {imm}, {n})")
    elif m == M.PMADDUBSW:
        _set(g, lambda d, s, n: f"S3_PMADDUBSW({d}, {s})")
    elif m == M.PMULHRSW:
        _set(g, lambda d, s, n: f"S3_PMULHRSW({d}, {s})")
    elif m in _SIGN:
        _set(g, lambda d, s, n: f"S3_PSIGN({d}, {s}, {_SIGN[m]})")
    else:
        _set(g, lambda d, s, n: f"S3_PABS({s}, {_ABS[m]})")


EMITTERS = {M.ADDSUBPS: _addsub, M.ADDSUBPD: _addsub, M.HADDPS: _hfp, M.HADDPD: _hfp,
            M.HSUBPS: _hfp, M.HSUBPD: _hfp, M.MOVDDUP: _dup, M.MOVSHDUP: _dup, M.MOVSLDUP: _dup,
            M.LDDQU: _load}
EMITTERS.update({m: _horiz for m in _HORIZ})
EMITTERS.update({m: _ssse3 for m in (M.PSHUFB, M.PALIGNR, M.PMADDUBSW, M.PMULHRSW, *_SIGN, *_ABS)})
