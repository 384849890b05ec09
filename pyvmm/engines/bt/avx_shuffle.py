"""AVX and AVX2 instructions with no legacy SSE twin, and the VEX.256 forms
that are not two independent 128-bit lanes: 256-bit moves, broadcasts,
128-bit inserts/extracts, permutes, per-element shifts, masked moves,
VTESTPS/PD and 256-bit PTEST/MOVMSK, VZEROUPPER/VZEROALL, and gathers.

Values are Python ints of up to 256 bits (YMM = c.xmm[n] | c.ymmh[n] << 128,
see vex.py).  Generated code raises GuestFault as described in vex.py;
masked moves and gathers fault only on the elements they access, and a
gather that faults leaves the elements it completed done, with their mask
bits cleared (the instruction restarts from there)."""

from __future__ import annotations

import struct

import iced_x86 as X

from . import flags as F
from .gen import GPR, SEG_INDEX, Gen, Unsupported
from .mmu import WRITE
from .simd import M128
from .vex import check_avx, is_vec, legacy_form, vread, vreg, vwrite

M = X.Mnemonic
OK = X.OpKind
Rg = X.Register
M64 = 0xFFFFFFFFFFFFFFFF
_FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}


def lanes(v: int, w: int, nbytes: int = 32, signed: bool = False) -> tuple:
    f = _FMT[w].lower() if signed else _FMT[w]
    return struct.unpack(f"<{nbytes // w}{f}", v.to_bytes(nbytes, "little"))


def unlanes(vals, w: int) -> int:
    m = (1 << (8 * w)) - 1
    return int.from_bytes(struct.pack(f"<{len(vals)}{_FMT[w]}", *[x & m for x in vals]), "little")


# -- pure operations (runtime helpers) ------------------------------------------
def broadcast(v: int, w: int, nbytes: int) -> int:
    if w == 16:
        return (v & M128) | (v & M128) << 128
    return unlanes([v & ((1 << (8 * w)) - 1)] * (nbytes // w), w)


def perm2x128(a: int, b: int, imm: int) -> int:
    halves = (a & M128, a >> 128, b & M128, b >> 128)
    lo = 0 if imm & 8 else halves[imm & 3]
    hi = 0 if imm & 0x80 else halves[imm >> 4 & 3]
    return lo | hi << 128


def permil_var(a: int, ctl: int, w: int, nbytes: int) -> int:
    """VPERMILPS/PD with a control vector: each element picks within its lane."""
    x, c = lanes(a, w, nbytes), lanes(ctl, w, nbytes)
    per = 16 // w
    sel = (lambda k: c[k] & 3) if w == 4 else (lambda k: c[k] >> 1 & 1)
    return unlanes([x[(k // per) * per + sel(k)] for k in range(len(x))], w)


def permil_imm(a: int, imm: int, w: int, nbytes: int) -> int:
    x = lanes(a, w, nbytes)
    per = 16 // w
    if w == 4:
        return unlanes([x[(k // per) * per + (imm >> (2 * (k % 4)) & 3)] for k in range(len(x))], 4)
    return unlanes([x[(k // per) * per + (imm >> k & 1)] for k in range(len(x))], 8)


def permd(idx: int, a: int) -> int:
    x, i = lanes(a, 4), lanes(idx, 4)
    return unlanes([x[k & 7] for k in i], 4)


def permq(a: int, imm: int) -> int:
    x = lanes(a, 8)
    return unlanes([x[imm >> (2 * k) & 3] for k in range(4)], 8)


def shiftv(a: int, cnt: int, w: int, kind: int, nbytes: int) -> int:
    """Per-element shifts: kind 0 left, 1 logical right, 2 arithmetic right."""
    bits = 8 * w
    out = []
    for x, n in zip(lanes(a, w, nbytes, kind == 2), lanes(cnt, w, nbytes)):
        if n >= bits:
            out.append((-1 if x < 0 else 0) if kind == 2 else 0)
        else:
            out.append(x << n if kind == 0 else x >> n)
    return unlanes(out, w)


def blendd(a: int, b: int, imm: int, nbytes: int) -> int:
    x, y = lanes(a, 4, nbytes), lanes(b, 4, nbytes)
    return unlanes([y[k] if imm >> k & 1 else x[k] for k in range(len(x))], 4)


def movmsk(v: int, w: int, nbytes: int) -> int:
    bits = 8 * w
    return sum((v >> (bits * (i + 1) - 1) & 1) << i for i in range(nbytes // w))


def vtest(a: int, b: int, w: int, nbytes: int) -> int:
    """RAW flags of VTESTPS/PD (sign bits only) and VPTEST (w = 0: all bits)."""
    if w:
        sign = sum(1 << (8 * w * (i + 1) - 1) for i in range(nbytes // w))
        a, b = a & sign, b & sign
    full = (1 << (8 * nbytes)) - 1
    return (F.ZF if not a & b else 0) | (F.CF if not (a ^ full) & b else 0)


def maskload(mmu, a: int, mask: int, w: int, nbytes: int) -> int:
    """Loads the elements whose mask sign bit is set; the others read as zero
    and are never accessed (so never fault)."""
    rd = {4: mmu.rd4, 8: mmu.rd8}[w]
    out = 0
    for i in range(nbytes // w):
        if mask >> (8 * w * (i + 1) - 1) & 1:
            out |= rd((a + w * i) & M64) << (8 * w * i)
    return out


def maskstore(mmu, a: int, mask: int, v: int, w: int, nbytes: int) -> None:
    """Stores the selected elements: every one is checked for writing
    first, so a fault leaves memory unchanged."""
    sel = [i for i in range(nbytes // w) if mask >> (8 * w * (i + 1) - 1) & 1]
    for i in sel:
        la = (a + w * i) & M64
        mmu.translate(la, WRITE)
        if (la & 0xFFF) + w > 0x1000:
            mmu.translate(((la | 0xFFF) + 1) & M64, WRITE)
    wr = {1: mmu.wr1, 4: mmu.wr4, 8: mmu.wr8}[w]
    m = (1 << (8 * w)) - 1
    for i in sel:
        wr((a + w * i) & M64, v >> (8 * w * i) & m)


def gather(c, d: int, k: int, x: int, base: int, scale: int, disp: int, iw: int, ew: int, n: int,
           seg: int, amask: int) -> None:
    """VGATHER*/VPGATHER*: element by element from the lowest, each loaded
    element written to YMMd and its mask element in YMMk cleared at once, so
    a fault leaves the completed ones done (bits past the last element stay
    as they were, as the CPU leaves them; only completion zeroes them and the
    mask).  seg: the segment base; amask: the address size's offset mask."""
    idx = lanes(c.xmm[x] | c.ymmh[x] << 128, iw, 32, True)
    rd = {4: c.mmu.rd4, 8: c.mmu.rd8}[ew]
    em = (1 << (8 * ew)) - 1
    top = 1 << (8 * ew - 1)
    for i in range(n):
        dv = c.xmm[d] | c.ymmh[d] << 128
        mv = c.xmm[k] | c.ymmh[k] << 128
        sh = 8 * ew * i
        if mv >> sh & top:
            v = rd((seg + ((base + idx[i] * scale + disp) & amask)) & M64)
            dv = (dv & ~(em << sh)) | v << sh
        mv &= ~(em << sh)
        c.xmm[d], c.ymmh[d] = dv & M128, dv >> 128
        c.xmm[k], c.ymmh[k] = mv & M128, mv >> 128
    # past the last element: the destination's rest and the whole mask are zero
    keep = (1 << (8 * ew * n)) - 1
    c.xmm[d], c.ymmh[d] = c.xmm[d] & keep, c.ymmh[d] & keep >> 128
    c.xmm[k] = c.ymmh[k] = 0


EXPORTS = {"AVX_BCAST": broadcast, "AVX_PERM2": perm2x128, "AVX_PERMILV": permil_var,
           "AVX_PERMILI": permil_imm, "AVX_PERMD": permd, "AVX_PERMQ": permq, "AVX_SHIFTV": shiftv,
           "AVX_BLENDD": blendd, "AVX_MOVMSK": movmsk, "AVX_VTEST": vtest, "AVX_MASKLOAD": maskload,
           "AVX_MASKSTORE": maskstore, "AVX_GATHER": gather}


# -- emitters ---------------------------------------------------------------------
def _width(g: Gen) -> int:
    """Vector length in bytes: 32 when any vector operand is a YMM register."""
    return 32 if any(is_vec(g, k) and vreg(g, k)[1] == 32 for k in range(g.ins.op_count)) else 16


def _imm(g: Gen) -> int:
    return g.ins.immediate(g.ins.op_count - 1) & 0xFF


def _wide_else_legacy(fn256):
    def em(g: Gen) -> None:
        if _width(g) == 32 or (g.ins.op_count and any(g.is_mem(k) for k in range(g.ins.op_count))
                               and X.MemorySizeInfo(g.ins.memory_size).size == 32):
            check_avx(g)
            fn256(g)
        else:
            legacy_form(g)
    return em


def _move(g: Gen) -> None:
    vwrite(g, 0, vread(g, 1))


def _movmsk(g: Gen) -> None:
    w = 1 if g.ins.mnemonic == M.VPMOVMSKB else 4 if g.ins.mnemonic == M.VMOVMSKPS else 8
    g.wreg(g.ins.op0_register, f"AVX_MOVMSK({vread(g, 1)}, {w}, 32)")


def _ptest(g: Gen) -> None:
    g.emit(f"t = AVX_VTEST({vread(g, 0)}, {vread(g, 1)}, 0, 32)")
    g.set_flags(F.RAW, 8, "t")


def _vtest(g: Gen) -> None:
    check_avx(g)
    w = 4 if g.ins.mnemonic == M.VTESTPS else 8
    g.emit(f"t = AVX_VTEST({vread(g, 0)}, {vread(g, 1)}, {w}, {_width(g)})")
    g.set_flags(F.RAW, 8, "t")


def _broadcast(g: Gen) -> None:
    check_avx(g)
    m = g.ins.mnemonic
    n = _width(g)
    if m in (M.VBROADCASTF128, M.VBROADCASTI128):
        vwrite(g, 0, f"AVX_BCAST({vread(g, 1)}, 16, 32)")
        return
    w = {M.VBROADCASTSS: 4, M.VBROADCASTSD: 8, M.VPBROADCASTB: 1, M.VPBROADCASTW: 2,
         M.VPBROADCASTD: 4, M.VPBROADCASTQ: 8}[m]
    src = vread(g, 1, w) if g.is_mem(1) else vread(g, 1)
    vwrite(g, 0, f"AVX_BCAST({src}, {w}, {n})")


def _insert128(g: Gen) -> None:
    check_avx(g)
    s1, s2 = vread(g, 1), vread(g, 2, 16)
    if _imm(g) & 1:
        vwrite(g, 0, f"(({s1}) & {M128:#x}) | {s2} << 128")
    else:
        vwrite(g, 0, f"(({s1}) & ~{M128:#x}) | {s2}")


def _extract128(g: Gen) -> None:
    check_avx(g)
    v = vread(g, 1)
    vwrite(g, 0, f"(({v}) >> 128)" if _imm(g) & 1 else f"(({v}) & {M128:#x})", 16)


def _perm2(g: Gen) -> None:
    check_avx(g)
    vwrite(g, 0, f"AVX_PERM2({vread(g, 1)}, {vread(g, 2)}, {_imm(g)})")


def _permil(g: Gen) -> None:
    check_avx(g)
    w = 4 if g.ins.mnemonic == M.VPERMILPS else 8
    n = _width(g)
    if g.is_imm(2):
        vwrite(g, 0, f"AVX_PERMILI({vread(g, 1)}, {_imm(g)}, {w}, {n})")
    else:
        vwrite(g, 0, f"AVX_PERMILV({vread(g, 1)}, {vread(g, 2)}, {w}, {n})")


def _permd(g: Gen) -> None:
    check_avx(g)
    vwrite(g, 0, f"AVX_PERMD({vread(g, 1)}, {vread(g, 2)})")


def _permq(g: Gen) -> None:
    check_avx(g)
    vwrite(g, 0, f"AVX_PERMQ({vread(g, 1)}, {_imm(g)})")


_SHIFTV = {M.VPSLLVD: (4, 0), M.VPSLLVQ: (8, 0), M.VPSRLVD: (4, 1), M.VPSRLVQ: (8, 1), M.VPSRAVD: (4, 2)}


def _shiftv(g: Gen) -> None:
    check_avx(g)
    w, kind = _SHIFTV[g.ins.mnemonic]
    vwrite(g, 0, f"AVX_SHIFTV({vread(g, 1)}, {vread(g, 2)}, {w}, {kind}, {_width(g)})")


def _blendd(g: Gen) -> None:
    check_avx(g)
    vwrite(g, 0, f"AVX_BLENDD({vread(g, 1)}, {vread(g, 2)}, {_imm(g)}, {_width(g)})")


_MASKMOV = {M.VMASKMOVPS: 4, M.VMASKMOVPD: 8, M.VPMASKMOVD: 4, M.VPMASKMOVQ: 8}


def _maskmov(g: Gen) -> None:
    check_avx(g)
    w = _MASKMOV[g.ins.mnemonic]
    n = _width(g)
    g.addr()
    g.fault()
    g.bind("c")
    if g.is_mem(0):     # store: mask is operand 1, data operand 2
        g.emit(f"AVX_MASKSTORE(c.mmu, a, {vread(g, 1)}, {vread(g, 2)}, {w}, {n})")
    else:
        vwrite(g, 0, f"AVX_MASKLOAD(c.mmu, a, {vread(g, 1)}, {w}, {n})")


def _maskmovdqu(g: Gen) -> None:
    """VMASKMOVDQU xmm1, xmm2: the bytes of xmm1 whose xmm2 byte has its top
    bit set go to DS:rDI (a segment override allowed)."""
    ins = g.ins
    check_avx(g)
    asz = {OK.MEMORY_SEG_RDI: 8, OK.MEMORY_SEG_EDI: 4, OK.MEMORY_SEG_DI: 2}.get(ins.op0_kind)
    if asz is None:
        raise Unsupported("maskmovdqu operand")
    rdi = g.reg(7) if asz == 8 else f"({g.reg(7)} & {(1 << (8 * asz)) - 1:#x})"
    seg = SEG_INDEX[ins.memory_segment]
    la = rdi if g.bits == 64 and seg not in (4, 5) else \
        f"(({g.bind('SB')}[{seg}] + {rdi}) & {M64 if g.bits == 64 else 0xFFFFFFFF:#x})"
    g.fault()
    g.emit(f"AVX_MASKSTORE(c.mmu, {la}, {vread(g, 2)}, {vread(g, 1)}, 1, 16)")


def _zeroupper(g: Gen) -> None:
    check_avx(g)
    if g.ins.mnemonic == M.VZEROALL:
        g.emit("c.xmm[:] = [0] * 16")
    g.emit("c.ymmh[:] = [0] * 16")


_GATHER = {M.VGATHERDPS: (4, 4), M.VGATHERQPS: (8, 4), M.VGATHERDPD: (4, 8), M.VGATHERQPD: (8, 8),
           M.VPGATHERDD: (4, 4), M.VPGATHERQD: (8, 4), M.VPGATHERDQ: (4, 8), M.VPGATHERQQ: (8, 8)}


def _gather(g: Gen) -> None:
    ins = g.ins
    iw, ew = _GATHER[ins.mnemonic]
    d, dw = vreg(g, 0)
    k, _ = vreg(g, 2)
    xr = ins.memory_index
    if Rg.XMM0 <= xr <= Rg.XMM15:
        x, xw = xr - Rg.XMM0, 16
    elif Rg.YMM0 <= xr <= Rg.YMM15:
        x, xw = xr - Rg.YMM0, 32
    else:
        raise Unsupported("gather index")
    if len({d, k, x}) < 3:
        raise Unsupported("gather with a register used twice")   # #UD, as the SDM says
    check_avx(g)
    n = min(dw // ew, xw // iw)
    base = "0" if ins.memory_base == Rg.NONE else g.rreg(ins.memory_base)
    seg = SEG_INDEX[ins.memory_segment]
    segbase = "0" if g.bits == 64 and seg not in (4, 5) else f"{g.bind('SB')}[{seg}]"
    amask = M64 if g.bits == 64 and (ins.memory_base == Rg.NONE or GPR[ins.memory_base][1] == 8) else 0xFFFFFFFF
    g.fault()
    g.emit(f"AVX_GATHER(c, {d}, {k}, {x}, {base}, {ins.memory_index_scale}, "
           f"{ins.memory_displacement & amask:#x}, {iw}, {ew}, {n}, {segbase}, {amask:#x})")


_MOVES = (M.VMOVUPS, M.VMOVAPS, M.VMOVUPD, M.VMOVAPD, M.VMOVDQU, M.VMOVDQA, M.VMOVNTPS, M.VMOVNTPD,
          M.VMOVNTDQ, M.VMOVNTDQA, M.VLDDQU)
EMITTERS = {m: _wide_else_legacy(_move) for m in _MOVES}
EMITTERS.update({m: _wide_else_legacy(_movmsk) for m in (M.VMOVMSKPS, M.VMOVMSKPD, M.VPMOVMSKB)})
EMITTERS.update({M.VPTEST: _wide_else_legacy(_ptest), M.VTESTPS: _vtest, M.VTESTPD: _vtest,
                 M.VINSERTF128: _insert128, M.VINSERTI128: _insert128, M.VEXTRACTF128: _extract128,
                 M.VEXTRACTI128: _extract128, M.VPERM2F128: _perm2, M.VPERM2I128: _perm2,
                 M.VPERMILPS: _permil, M.VPERMILPD: _permil, M.VPERMD: _permd, M.VPERMPS: _permd,
                 M.VPERMQ: _permq, M.VPERMPD: _permq, M.VPBLENDD: _blendd,
                 M.VZEROUPPER: _zeroupper, M.VZEROALL: _zeroupper, M.VMASKMOVDQU: _maskmovdqu})
EMITTERS.update({m: _broadcast for m in (M.VBROADCASTSS, M.VBROADCASTSD, M.VBROADCASTF128, M.VBROADCASTI128,
                                         M.VPBROADCASTB, M.VPBROADCASTW, M.VPBROADCASTD, M.VPBROADCASTQ)})
EMITTERS.update({m: _shiftv for m in _SHIFTV})
EMITTERS.update({m: _maskmov for m in _MASKMOV})
EMITTERS.update({m: _gather for m in _GATHER})
