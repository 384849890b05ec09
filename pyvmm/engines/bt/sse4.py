"""SSE4.1, and the non-string half of SSE4.2 (crc32, pcmpgtq), in their
legacy 128-bit encodings: ptest, round*, blend*, packed min/max/multiply,
pinsr*/pextr*, insertps/extractps, pmovzx*/pmovsx*, packusdw, pcmpeqq,
dpps/dppd, mpsadbw, phminposuw and movntdqa.

Floating point goes through ssefp.fparith lane by lane (its rounding and
NaN rules); dpps/dppd round after each step, as the SDM's pseudocode does.

Generated code raises GuestFault as described in simd.py."""

from __future__ import annotations

import math

import iced_x86 as X

from . import flags as F
from .gen import MASK, Gen, Unsupported
from .simd import M128, check_sse, is_xmm, lanes, unlanes, xread, xreg
from .ssefp import fparith, from_float, to_float

M = X.Mnemonic
M64 = 0xFFFFFFFFFFFFFFFF
_FMT = {4: (0x7F800000, 0x7FFFFF, 1 << 22), 8: (0x7FF0000000000000, (1 << 52) - 1, 1 << 51)}


# -- floating point -----------------------------------------------------------------
def fround(b: int, w: int, mode: int) -> int:
    """One lane rounded to an integral value: mode 0 nearest-even, 1 down,
    2 up, 3 toward zero. NaNs come back quieted, zeros and infinities as they are."""
    exp, mant, qbit = _FMT[w]
    if b & exp == exp:
        return b | qbit if b & mant else b
    x = to_float(b, w)
    if x == 0.0:
        return b
    r = (round, math.floor, math.ceil, math.trunc)[mode](x)
    return from_float(math.copysign(float(r), x), w)


def round_packed(s: int, w: int, mode: int) -> int:
    return unlanes([fround(v, w, mode) for v in lanes(s, w)], w)


def dpps(d: int, s: int, imm: int) -> int:
    x, y = lanes(d, 4), lanes(s, 4)
    p = [fparith(2, x[i], y[i], 4, True) if imm >> (4 + i) & 1 else 0 for i in range(4)]
    t = fparith(0, fparith(0, p[0], p[1], 4, True), fparith(0, p[2], p[3], 4, True), 4, True)
    return unlanes([t if imm >> i & 1 else 0 for i in range(4)], 4)


def dppd(d: int, s: int, imm: int) -> int:
    x, y = lanes(d, 8), lanes(s, 8)
    p = [fparith(2, x[i], y[i], 8, True) if imm >> (4 + i) & 1 else 0 for i in range(2)]
    t = fparith(0, p[0], p[1], 8, True)
    return unlanes([t if imm >> i & 1 else 0 for i in range(2)], 8)


# -- integer ---------------------------------------------------------------------------
def _mk(w: int, fn, signed: bool = False):
    def op(a: int, b: int) -> int:
        return unlanes(map(fn, lanes(a, w, signed), lanes(b, w, signed)), w)
    return op


def packusdw(a: int, b: int) -> int:
    """Signed dwords of a then b, saturated to unsigned words."""
    return unlanes([0 if v < 0 else min(v, 0xFFFF) for v in lanes(a, 4, True) + lanes(b, 4, True)], 2)


def pmuldq(a: int, b: int) -> int:
    x, y = lanes(a, 4, True), lanes(b, 4, True)
    return unlanes([x[0] * y[0], x[2] * y[2]], 8)


_INT = {
    M.PMULLD: _mk(4, int.__mul__), M.PMULDQ: pmuldq,
    M.PMINSB: _mk(1, min, True), M.PMAXSB: _mk(1, max, True), M.PMINUW: _mk(2, min), M.PMAXUW: _mk(2, max),
    M.PMINSD: _mk(4, min, True), M.PMAXSD: _mk(4, max, True), M.PMINUD: _mk(4, min), M.PMAXUD: _mk(4, max),
    M.PCMPEQQ: _mk(8, lambda x, y: -(x == y)), M.PCMPGTQ: _mk(8, lambda x, y: -(x > y), True),
    M.PACKUSDW: packusdw,
}


def blend(d: int, s: int, sel: int, w: int) -> int:
    """Lane i from s where bit i of sel is set."""
    return unlanes([b if sel >> i & 1 else a for i, (a, b) in enumerate(zip(lanes(d, w), lanes(s, w)))], w)


def blendv(d: int, s: int, mask: int, w: int) -> int:
    sel = sum((v >> (8 * w - 1)) << i for i, v in enumerate(lanes(mask, w)))
    return blend(d, s, sel, w)


def ptest(d: int, s: int) -> int:
    """RAW flags: ZF when d AND s is zero, CF when (NOT d) AND s is zero."""
    return (F.ZF if not d & s else 0) | (F.CF if not (d ^ M128) & s else 0)


def pmovx(s: int, wfrom: int, wto: int, signed: bool) -> int:
    return unlanes(lanes(s, wfrom, signed)[:16 // wto], wto)


def insertps(d: int, v: int, imm: int) -> int:
    """v is the dword already picked from the source."""
    at = 32 * (imm >> 4 & 3)
    d = (d & ~(0xFFFFFFFF << at)) | v << at
    return unlanes([0 if imm >> i & 1 else x for i, x in enumerate(lanes(d, 4))], 4)


def mpsadbw(d: int, s: int, imm: int) -> int:
    x, y = lanes(d, 1), lanes(s, 1)
    do, so = 4 * (imm >> 2 & 1), 4 * (imm & 3)
    return unlanes([sum(abs(x[do + i + j] - y[so + j]) for j in range(4)) for i in range(8)], 2)


def phminposuw(s: int) -> int:
    v = lanes(s, 2)
    m = min(v)
    return m | v.index(m) << 16


# CRC-32C (Castagnoli), reflected, as the crc32 instruction computes it.
_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ (0x82F63B78 if _c & 1 else 0)
    _CRC_TABLE.append(_c)


def crc32c(crc: int, v: int, size: int) -> int:
    for _ in range(size):
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ v) & 0xFF]
        v >>= 8
    return crc


EXPORTS = {"S4_ROUNDP": round_packed, "S4_FROUND": fround, "S4_DPPS": dpps, "S4_DPPD": dppd,
           "S4_BLEND": blend, "S4_BLENDV": blendv, "S4_PTEST": ptest, "S4_PMOVX": pmovx,
           "S4_INSERTPS": insertps, "S4_MPSADBW": mpsadbw, "S4_PHMINPOSUW": phminposuw,
           "S4_CRC32C": crc32c}
for _m, _fn in _INT.items():
    EXPORTS[f"S4_{int(_m)}"] = _fn


# -- emitters -----------------------------------------------------------------------------
def _imm(g: Gen) -> int:
    return g.ins.immediate(g.ins.op_count - 1) & 0xFF


def _int(g: Gen) -> None:
    check_sse(g)
    d = xreg(g, 0)
    s = xread(g, 1)
    g.emit(f"c.xmm[{d}] = S4_{int(g.ins.mnemonic)}(c.xmm[{d}], {s})")


_ROUND = {M.ROUNDPS: (4, False), M.ROUNDPD: (8, False), M.ROUNDSS: (4, True), M.ROUNDSD: (8, True)}


def _round(g: Gen) -> None:
    check_sse(g)
    w, scalar = _ROUND[g.ins.mnemonic]
    imm = _imm(g)
    mode = "(c.mxcsr >> 13 & 3)" if imm & 4 else str(imm & 3)
    d = xreg(g, 0)
    if scalar:
        s = xread(g, 1, w)
        g.emit(f"c.xmm[{d}] = (c.xmm[{d}] & ~{MASK[w]:#x}) | S4_FROUND({s} & {MASK[w]:#x}, {w}, {mode})")
    else:
        g.emit(f"c.xmm[{d}] = S4_ROUNDP({xread(g, 1)}, {w}, {mode})")


_BLEND = {M.BLENDPS: 4, M.BLENDPD: 8, M.PBLENDW: 2}
_BLENDV = {M.BLENDVPS: 4, M.BLENDVPD: 8, M.PBLENDVB: 1}


def _blend(g: Gen) -> None:
    check_sse(g)
    m = g.ins.mnemonic
    d = xreg(g, 0)
    s = xread(g, 1)
    if m in _BLEND:
        g.emit(f"c.xmm[{d}] = S4_BLEND(c.xmm[{d}], {s}, {_imm(g)}, {_BLEND[m]})")
    else:
        g.emit(f"c.xmm[{d}] = S4_BLENDV(c.xmm[{d}], {s}, c.xmm[0], {_BLENDV[m]})")


def _ptest(g: Gen) -> None:
    check_sse(g)
    s = xread(g, 1)
    g.emit(f"t = S4_PTEST(c.xmm[{xreg(g, 0)}], {s})")
    g.set_flags(F.RAW, 8, "t")


_PMOV = {}
for _sign in ("ZX", "SX"):
    for _pair, _wf, _wt in (("BW", 1, 2), ("BD", 1, 4), ("BQ", 1, 8), ("WD", 2, 4), ("WQ", 2, 8), ("DQ", 4, 8)):
        _PMOV[getattr(M, f"PMOV{_sign}{_pair}")] = (_wf, _wt, _sign == "SX")


def _pmov(g: Gen) -> None:
    check_sse(g)
    wf, wt, signed = _PMOV[g.ins.mnemonic]
    g.emit(f"c.xmm[{xreg(g, 0)}] = S4_PMOVX({xread(g, 1)}, {wf}, {wt}, {signed})")


_LANE = {M.PEXTRB: 1, M.PEXTRD: 4, M.PEXTRQ: 8, M.EXTRACTPS: 4, M.PINSRB: 1, M.PINSRD: 4, M.PINSRQ: 8}


def _pextr(g: Gen) -> None:
    check_sse(g)
    w = _LANE[g.ins.mnemonic]
    k = _imm(g) & (16 // w - 1)
    v = f"((c.xmm[{xreg(g, 1)}] >> {8 * w * k}) & {MASK[w]:#x})"
    if g.is_mem(0):
        g.write(0, v, w)
    else:
        g.wreg(g.ins.op0_register, v)   # a 32/64-bit register: zero-extended


def _pinsr(g: Gen) -> None:
    check_sse(g)
    w = _LANE[g.ins.mnemonic]
    k = _imm(g) & (16 // w - 1)
    d = xreg(g, 0)
    src = g.read(1, w) if g.is_mem(1) else f"({g.read(1)} & {MASK[w]:#x})"
    at = 8 * w * k
    g.emit(f"c.xmm[{d}] = (c.xmm[{d}] & ~{MASK[w] << at:#x}) | {src} << {at}")


def _insertps(g: Gen) -> None:
    check_sse(g)
    imm = _imm(g)
    d = xreg(g, 0)
    if is_xmm(g, 1):
        v = f"(c.xmm[{xreg(g, 1)}] >> {32 * (imm >> 6)} & 0xFFFFFFFF)"
    else:
        v = xread(g, 1, 4)
    g.emit(f"c.xmm[{d}] = S4_INSERTPS(c.xmm[{d}], {v}, {imm})")


def _imm3(g: Gen) -> None:
    """dpps/dppd/mpsadbw: xmm, xmm/m128, imm8."""
    check_sse(g)
    fn = {M.DPPS: "S4_DPPS", M.DPPD: "S4_DPPD", M.MPSADBW: "S4_MPSADBW"}[g.ins.mnemonic]
    d = xreg(g, 0)
    s = xread(g, 1)
    g.emit(f"c.xmm[{d}] = {fn}(c.xmm[{d}], {s}, {_imm(g)})")


def _phminposuw(g: Gen) -> None:
    check_sse(g)
    g.emit(f"c.xmm[{xreg(g, 0)}] = S4_PHMINPOSUW({xread(g, 1)})")


def _movntdqa(g: Gen) -> None:
    check_sse(g)
    if not g.is_mem(1):
        raise Unsupported("register source")
    g.emit(f"c.xmm[{xreg(g, 0)}] = {xread(g, 1)}")


def _crc32(g: Gen) -> None:
    size = g.size(1)
    g.write(0, f"S4_CRC32C({g.rreg(g.ins.op0_register)} & 0xFFFFFFFF, {g.read(1)}, {size})")


EMITTERS = {m: _int for m in _INT}
EMITTERS.update({m: _round for m in _ROUND})
EMITTERS.update({m: _blend for m in (*_BLEND, *_BLENDV)})
EMITTERS.update({m: _pmov for m in _PMOV})
EMITTERS.update({M.PTEST: _ptest, M.PEXTRB: _pextr, M.PEXTRD: _pextr, M.PEXTRQ: _pextr,
                 M.EXTRACTPS: _pextr, M.PINSRB: _pinsr, M.PINSRD: _pinsr, M.PINSRQ: _pinsr,
                 M.INSERTPS: _insertps, M.DPPS: _imm3, M.DPPD: _imm3, M.MPSADBW: _imm3,
                 M.PHMINPOSUW: _phminposuw, M.MOVNTDQA: _movntdqa, M.CRC32: _crc32})
# crc32 touches no SSE state: it needs no CR0/CR4 check and stays out of FP_MNEMONICS.
PURE = frozenset({M.CRC32})
