"""SSE/SSE2 integer, move, logic and shuffle instructions (legacy encodings).

Packed operations are pure functions on 128-bit ints (see simd.lanes);
emitters generate `c.xmm[d] = OP(c.xmm[d], src)` around them. VEX/EVEX
forms and MMX-register forms are not implemented (#UD): the CPUID the
engine reports does not advertise AVX.

Generated code raises GuestFault as described in simd.py."""

from __future__ import annotations

import iced_x86 as X

from .gen import MASK, Gen, Unsupported
from .simd import M128, check_sse, is_xmm, lanes, unlanes, xread, xreg, xwrite

M = X.Mnemonic
M64 = 0xFFFFFFFFFFFFFFFF


# -- packed integer arithmetic ------------------------------------------------
def _sat(v: int, lo: int, hi: int) -> int:
    return lo if v < lo else hi if v > hi else v


def _mk(w: int, fn, signed: bool = False):
    def op(a: int, b: int) -> int:
        return unlanes(map(fn, lanes(a, w, signed), lanes(b, w, signed)), w)
    return op


_INT2 = {
    M.PADDB: _mk(1, int.__add__), M.PADDW: _mk(2, int.__add__), M.PADDD: _mk(4, int.__add__),
    M.PADDQ: _mk(8, int.__add__), M.PSUBB: _mk(1, int.__sub__), M.PSUBW: _mk(2, int.__sub__),
    M.PSUBD: _mk(4, int.__sub__), M.PSUBQ: _mk(8, int.__sub__),
    M.PADDUSB: _mk(1, lambda x, y: min(x + y, 0xFF)), M.PADDUSW: _mk(2, lambda x, y: min(x + y, 0xFFFF)),
    M.PSUBUSB: _mk(1, lambda x, y: max(x - y, 0)), M.PSUBUSW: _mk(2, lambda x, y: max(x - y, 0)),
    M.PADDSB: _mk(1, lambda x, y: _sat(x + y, -128, 127), True),
    M.PADDSW: _mk(2, lambda x, y: _sat(x + y, -32768, 32767), True),
    M.PSUBSB: _mk(1, lambda x, y: _sat(x - y, -128, 127), True),
    M.PSUBSW: _mk(2, lambda x, y: _sat(x - y, -32768, 32767), True),
    M.PCMPEQB: _mk(1, lambda x, y: -(x == y)), M.PCMPEQW: _mk(2, lambda x, y: -(x == y)),
    M.PCMPEQD: _mk(4, lambda x, y: -(x == y)),
    M.PCMPGTB: _mk(1, lambda x, y: -(x > y), True), M.PCMPGTW: _mk(2, lambda x, y: -(x > y), True),
    M.PCMPGTD: _mk(4, lambda x, y: -(x > y), True),
    M.PMINUB: _mk(1, min), M.PMAXUB: _mk(1, max), M.PMINSW: _mk(2, min, True), M.PMAXSW: _mk(2, max, True),
    M.PAVGB: _mk(1, lambda x, y: (x + y + 1) >> 1), M.PAVGW: _mk(2, lambda x, y: (x + y + 1) >> 1),
    M.PMULLW: _mk(2, int.__mul__), M.PMULHW: _mk(2, lambda x, y: (x * y) >> 16, True),
    M.PMULHUW: _mk(2, lambda x, y: (x * y) >> 16),
}


def pmuludq(a: int, b: int) -> int:
    return ((a & 0xFFFFFFFF) * (b & 0xFFFFFFFF)) | ((a >> 64 & 0xFFFFFFFF) * (b >> 64 & 0xFFFFFFFF)) << 64


def pmaddwd(a: int, b: int) -> int:
    x, y = lanes(a, 2, True), lanes(b, 2, True)
    return unlanes([x[i] * y[i] + x[i + 1] * y[i + 1] for i in range(0, 8, 2)], 4)


def psadbw(a: int, b: int) -> int:
    x, y = lanes(a, 1), lanes(b, 1)
    lo = sum(abs(x[i] - y[i]) for i in range(8))
    hi = sum(abs(x[i] - y[i]) for i in range(8, 16))
    return lo | hi << 64


def _pack(w: int, lo: int, hi: int):
    def op(a: int, b: int) -> int:
        return unlanes([_sat(v, lo, hi) for v in lanes(a, w, True) + lanes(b, w, True)], w // 2)
    return op


def _unpack(w: int, high: bool):
    def op(a: int, b: int) -> int:
        n = 8 // w
        x, y = lanes(a, w), lanes(b, w)
        if high:
            x, y = x[n:], y[n:]
        out = []
        for i in range(n):
            out += (x[i], y[i])
        return unlanes(out, w)
    return op


_INT2.update({
    M.PMULUDQ: pmuludq, M.PMADDWD: pmaddwd, M.PSADBW: psadbw,
    M.PACKSSWB: _pack(2, -128, 127), M.PACKSSDW: _pack(4, -32768, 32767), M.PACKUSWB: _pack(2, 0, 255),
    M.PUNPCKLBW: _unpack(1, False), M.PUNPCKLWD: _unpack(2, False), M.PUNPCKLDQ: _unpack(4, False),
    M.PUNPCKLQDQ: _unpack(8, False), M.PUNPCKHBW: _unpack(1, True), M.PUNPCKHWD: _unpack(2, True),
    M.PUNPCKHDQ: _unpack(4, True), M.PUNPCKHQDQ: _unpack(8, True),
    M.UNPCKLPS: _unpack(4, False), M.UNPCKHPS: _unpack(4, True),
    M.UNPCKLPD: _unpack(8, False), M.UNPCKHPD: _unpack(8, True),
})

# -- logic (inline) -------------------------------------------------------------
_ANDN = f"({{d}} ^ {M128:#x}) & {{s}}"
_LOGIC = {M.PXOR: "{d} ^ {s}", M.XORPS: "{d} ^ {s}", M.XORPD: "{d} ^ {s}", M.POR: "{d} | {s}",
          M.ORPS: "{d} | {s}", M.ORPD: "{d} | {s}", M.PAND: "{d} & {s}", M.ANDPS: "{d} & {s}",
          M.ANDPD: "{d} & {s}", M.PANDN: _ANDN, M.ANDNPS: _ANDN, M.ANDNPD: _ANDN}


# -- shifts -----------------------------------------------------------------------
def pshift(v: int, cnt: int, w: int, kind: int) -> int:
    """kind 0 = left, 1 = logical right, 2 = arithmetic right, per w-byte lane."""
    bits = 8 * w
    if cnt >= bits:
        if kind != 2:
            return 0
        cnt = bits - 1
    if kind == 0:
        return unlanes([x << cnt for x in lanes(v, w)], w)
    return unlanes([x >> cnt for x in lanes(v, w, kind == 2)], w)


_SHIFTS = {M.PSLLW: (2, 0), M.PSLLD: (4, 0), M.PSLLQ: (8, 0), M.PSRLW: (2, 1), M.PSRLD: (4, 1),
           M.PSRLQ: (8, 1), M.PSRAW: (2, 2), M.PSRAD: (4, 2)}


# -- shuffles -----------------------------------------------------------------------
def pshufd(s: int, imm: int) -> int:
    x = lanes(s, 4)
    return unlanes([x[(imm >> (2 * i)) & 3] for i in range(4)], 4)


def pshuflw(s: int, imm: int) -> int:
    x = lanes(s, 2)
    return unlanes([x[(imm >> (2 * i)) & 3] for i in range(4)] + list(x[4:]), 2)


def pshufhw(s: int, imm: int) -> int:
    x = lanes(s, 2)
    return unlanes(list(x[:4]) + [x[4 + ((imm >> (2 * i)) & 3)] for i in range(4)], 2)


def shufps(d: int, s: int, imm: int) -> int:
    x, y = lanes(d, 4), lanes(s, 4)
    return unlanes([x[imm & 3], x[imm >> 2 & 3], y[imm >> 4 & 3], y[imm >> 6 & 3]], 4)


def shufpd(d: int, s: int, imm: int) -> int:
    return (d >> (64 * (imm & 1)) & M64) | (s >> (64 * (imm >> 1 & 1)) & M64) << 64


def pmovmskb(v: int) -> int:
    r = 0
    for i, b in enumerate(v.to_bytes(16, "little")):
        r |= (b >> 7) << i
    return r


def movmsk(v: int, w: int) -> int:
    bits = 8 * w
    return sum(((v >> (bits * (i + 1) - 1)) & 1) << i for i in range(16 // w))


EXPORTS = {"PSHIFT": pshift, "PSHUFD": pshufd, "PSHUFLW": pshuflw, "PSHUFHW": pshufhw,
           "SHUFPS": shufps, "SHUFPD": shufpd, "PMOVMSKB": pmovmskb, "MOVMSK": movmsk}
for _m, _fn in _INT2.items():
    EXPORTS[f"P_{int(_m)}"] = _fn


# -- emitters -------------------------------------------------------------------------
def _int2(g: Gen) -> None:
    check_sse(g)
    d = xreg(g, 0)
    s = xread(g, 1)
    g.emit(f"c.xmm[{d}] = P_{int(g.ins.mnemonic)}(c.xmm[{d}], {s})")


def _logic(g: Gen) -> None:
    check_sse(g)
    d = xreg(g, 0)
    ins = g.ins
    if g.is_reg(1) and ins.op1_register == ins.op0_register and ins.mnemonic in (
            M.PXOR, M.XORPS, M.XORPD, M.PANDN, M.ANDNPS, M.ANDNPD):
        g.emit(f"c.xmm[{d}] = 0")
        return
    s = xread(g, 1)
    expr = _LOGIC[ins.mnemonic].format(d=f"c.xmm[{d}]", s=s)
    g.emit(f"c.xmm[{d}] = {expr}")


def _shift(g: Gen) -> None:
    check_sse(g)
    w, kind = _SHIFTS[g.ins.mnemonic]
    d = xreg(g, 0)
    if g.is_imm(1):
        cnt = str(g.ins.immediate(1) & 0xFF)
    else:
        cnt = f"({xread(g, 1)} & {M64:#x})"
    g.emit(f"c.xmm[{d}] = PSHIFT(c.xmm[{d}], {cnt}, {w}, {kind})")


def _byteshift(g: Gen) -> None:
    check_sse(g)
    d = xreg(g, 0)
    n = g.ins.immediate(1) & 0xFF
    if n > 15:
        g.emit(f"c.xmm[{d}] = 0")
    elif g.ins.mnemonic == M.PSLLDQ:
        g.emit(f"c.xmm[{d}] = (c.xmm[{d}] << {8 * n}) & {M128:#x}")
    else:
        g.emit(f"c.xmm[{d}] = c.xmm[{d}] >> {8 * n}")


def _shuf1(g: Gen) -> None:
    check_sse(g)
    d = xreg(g, 0)
    s = xread(g, 1)
    fn = {M.PSHUFD: "PSHUFD", M.PSHUFLW: "PSHUFLW", M.PSHUFHW: "PSHUFHW"}[g.ins.mnemonic]
    g.emit(f"c.xmm[{d}] = {fn}({s}, {g.ins.immediate(2) & 0xFF})")


def _shuf2(g: Gen) -> None:
    check_sse(g)
    d = xreg(g, 0)
    s = xread(g, 1)
    fn = "SHUFPS" if g.ins.mnemonic == M.SHUFPS else "SHUFPD"
    g.emit(f"c.xmm[{d}] = {fn}(c.xmm[{d}], {s}, {g.ins.immediate(2) & 0xFF})")


def _movmsk(g: Gen) -> None:
    check_sse(g)
    s = f"c.xmm[{xreg(g, 1)}]"
    m = g.ins.mnemonic
    expr = f"PMOVMSKB({s})" if m == M.PMOVMSKB else f"MOVMSK({s}, {4 if m == M.MOVMSKPS else 8})"
    g.wreg(g.ins.op0_register, expr)


def _mov128(g: Gen) -> None:
    """movaps/movups/movapd/movupd/movdqa/movdqu/movntps/movntpd/movntdq."""
    check_sse(g)
    if g.is_mem(0):
        xwrite(g, 0, f"c.xmm[{xreg(g, 1)}]")
    else:
        if g.ins.mnemonic in (M.MOVNTPS, M.MOVNTPD, M.MOVNTDQ):
            raise Unsupported("movnt to register")
        g.emit(f"t = {xread(g, 1)}")
        xwrite(g, 0, "t")


def _movdq(g: Gen) -> None:
    """movd/movq between XMM and GPR/memory, and movq xmm<->xmm/m64."""
    check_sse(g)
    size = 8 if g.ins.mnemonic == M.MOVQ else 4
    if is_xmm(g, 0):
        if is_xmm(g, 1) or g.is_mem(1):
            src = xread(g, 1, size)
        else:
            src = g.read(1, size)
        g.emit(f"c.xmm[{xreg(g, 0)}] = {src} & {MASK[size]:#x}")
    elif is_xmm(g, 1):
        v = f"(c.xmm[{xreg(g, 1)}] & {MASK[size]:#x})"
        if g.is_mem(0):
            xwrite(g, 0, v, size)
        else:
            g.write(0, v, size)
    else:
        raise Unsupported("MMX movd/movq")


def _movnti(g: Gen) -> None:
    size = g.size(1)
    g.write(0, g.read(1), size)


def _movhl(g: Gen) -> None:
    """movlps/movlpd/movhps/movhpd (64-bit halves) and movhlps/movlhps."""
    check_sse(g)
    m = g.ins.mnemonic
    high = m in (M.MOVHPS, M.MOVHPD, M.MOVLHPS)
    if g.is_mem(0):
        xwrite(g, 0, f"(c.xmm[{xreg(g, 1)}] >> {64 if high else 0}) & {M64:#x}", 8)
        return
    d = xreg(g, 0)
    if m == M.MOVHLPS:
        src = f"(c.xmm[{xreg(g, 1)}] >> 64)"
    elif m == M.MOVLHPS:
        src = f"(c.xmm[{xreg(g, 1)}] & {M64:#x})"
    else:
        src = xread(g, 1, 8)
    if high:
        g.emit(f"c.xmm[{d}] = (c.xmm[{d}] & {M64:#x}) | {src} << 64")
    else:
        g.emit(f"c.xmm[{d}] = (c.xmm[{d}] & ~{M64:#x}) | {src}")


def _pextrw(g: Gen) -> None:
    check_sse(g)
    if not is_xmm(g, 1):
        raise Unsupported("pextrw form")
    imm = g.ins.immediate(2) & 7
    v = f"((c.xmm[{xreg(g, 1)}] >> {16 * imm}) & 0xFFFF)"
    if g.is_mem(0):
        g.write(0, v, 2)
    else:
        g.wreg(g.ins.op0_register, v)


def _pinsrw(g: Gen) -> None:
    check_sse(g)
    d = xreg(g, 0)
    imm = g.ins.immediate(2) & 7
    src = g.read(1, 2) if g.is_mem(1) else f"({g.read(1)} & 0xFFFF)"
    g.emit(f"c.xmm[{d}] = (c.xmm[{d}] & ~{0xFFFF << (16 * imm):#x}) | {src} << {16 * imm}")


def _mxcsr(g: Gen) -> None:
    from .faults import GP
    check_sse(g)
    g.addr()
    if g.ins.mnemonic == M.STMXCSR:
        g.wmem(4, "c.mxcsr")
    else:
        g.emit(f"t = {g.rmem(4)}")
        g.emit(f"if t & 0xFFFF0000: raise GuestFault({GP}, 0)")
        g.emit("c.mxcsr = t")


EMITTERS = {m: _int2 for m in _INT2}
EMITTERS.update({m: _logic for m in _LOGIC})
EMITTERS.update({m: _shift for m in _SHIFTS})
EMITTERS.update({
    M.PSLLDQ: _byteshift, M.PSRLDQ: _byteshift, M.PSHUFD: _shuf1, M.PSHUFLW: _shuf1,
    M.PSHUFHW: _shuf1, M.SHUFPS: _shuf2, M.SHUFPD: _shuf2, M.PMOVMSKB: _movmsk,
    M.MOVMSKPS: _movmsk, M.MOVMSKPD: _movmsk, M.MOVD: _movdq, M.MOVQ: _movdq, M.MOVNTI: _movnti,
    M.MOVLPS: _movhl, M.MOVLPD: _movhl, M.MOVHPS: _movhl, M.MOVHPD: _movhl, M.MOVHLPS: _movhl,
    M.MOVLHPS: _movhl, M.PEXTRW: _pextrw, M.PINSRW: _pinsrw, M.LDMXCSR: _mxcsr, M.STMXCSR: _mxcsr,
})
for _m in (M.MOVAPS, M.MOVUPS, M.MOVAPD, M.MOVUPD, M.MOVDQA, M.MOVDQU, M.MOVNTPS, M.MOVNTPD, M.MOVNTDQ):
    EMITTERS[_m] = _mov128
