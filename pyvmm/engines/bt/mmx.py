"""MMX: the eight 64-bit MM registers and the MMX integer instructions.

MMi is the 64-bit mantissa of the physical x87 register Ri (SDM vol. 1,
9.5): writing it stores the 80-bit image 0xFFFF:value, and every MMX
instruction except EMMS sets TOP to 0 and tags all registers valid; EMMS
tags them all empty. The packed arithmetic reuses the SSE lane helpers
(sse.py) on 64-bit operands zero-extended to 128 bits.

MMX shares its mnemonics with SSE2, so `merge` wraps the table's emitters:
an instruction with an MM register operand goes here, any other to SSE.

Generated code raises GuestFault: #UD (CR0.EM), #NM (CR0.TS), memory faults,
always before changing MMX state."""

from __future__ import annotations

import iced_x86 as X

from .cpuidbits import VENDOR
from .faults import NM, UD, GuestFault
from .gen import MASK, SEG_INDEX, Gen, Unsupported
from .simd import check_sse, xreg
from .x87state import from80, fpu_of, to80

M = X.Mnemonic
OK = X.OpKind
Rg = X.Register
M64 = 0xFFFFFFFFFFFFFFFF
CR0_EM, CR0_TS = 4, 8
MMX_EXPONENT = 0xFFFF << 64   # sign and exponent bits of a register MMX wrote
AMD_EBX = int.from_bytes(b"Auth", "little")   # CPUID.0:EBX of "AuthenticAMD"


# -- runtime helpers ------------------------------------------------------------
def mmx_trap(c) -> None:
    """CR0.EM gives #UD, CR0.TS #NM. Raises GuestFault."""
    raise GuestFault(UD if c.cr0 & CR0_EM else NM)


def mmx_enter(c):
    """The FPU after the MMX state transition: TOP = 0, all tags valid."""
    f = fpu_of(c)
    f.top = 0
    f.empty = [False] * 8
    return f


def mm_get(f, i: int) -> int:
    """MMi: the low 64 bits of physical register i, whatever its tag."""
    r = f.raw[i]
    return (r if r is not None else to80(f.regs[i])) & M64


def mm_set(f, i: int, v: int) -> None:
    raw = MMX_EXPONENT | v
    f.raw[i], f.regs[i] = raw, from80(raw)


def emms(c) -> None:
    """Tags all empty; AMD CPUs also set TOP to 0 (the EPYC hosts here do;
    the Intel SDM leaves TOP alone), so bt follows the vendor it reports."""
    f = fpu_of(c)
    f.empty = [True] * 8
    if _vendor_ebx(c) == AMD_EBX:
        f.top = 0


def _vendor_ebx(c) -> int:
    table = getattr(c, "cpuid", None)
    if table is None:
        return int.from_bytes(VENDOR[:4], "little")
    return table.lookup(0, 0)[1]


def maskmovq(c, f, la, mm: int, sel: int, wr1) -> None:
    """Stores the bytes of `mm` whose byte in `sel` has its top bit set, at la(i)."""
    for i in range(8):
        if sel >> (8 * i + 7) & 1:
            wr1(la(i), mm >> (8 * i) & 0xFF)


EXPORTS = {"MMX_TRAP": mmx_trap, "MMX": mmx_enter, "MMG": mm_get, "MMS": mm_set, "EMMS_": emms,
           "MASKMOVQ": maskmovq}


# -- operand plumbing ---------------------------------------------------------------
def is_mm(g: Gen, i: int) -> bool:
    return g.is_reg(i) and Rg.MM0 <= g.ins.op_register(i) <= Rg.MM7


def uses_mm(g: Gen) -> bool:
    return any(is_mm(g, i) for i in range(g.ins.op_count))


def mreg(g: Gen, i: int) -> int:
    if not is_mm(g, i):
        raise Unsupported("MMX operand")
    return g.ins.op_register(i) - Rg.MM0


def _check(g: Gen) -> None:
    g.fault()
    g.bind("c")
    g.emit(f"if c.cr0 & {CR0_EM | CR0_TS:#x}: MMX_TRAP(c)")


def _msize(g: Gen) -> int:
    return X.MemorySizeInfo(g.ins.memory_size).size


def _src(g: Gen, i: int) -> str:
    """Expression for MM/memory operand i, loaded before any state changes."""
    if is_mm(g, i):
        return f"MMG(f, {mreg(g, i)})"
    if not g.is_mem(i):
        raise Unsupported("MMX operand kind")
    g.addr()
    g.load(f"m{i}", _msize(g))
    return f"m{i}"


def _set(g: Gen, d: int, v: str) -> None:
    g.emit(f"MMS(f, {d}, {v})")


# -- packed arithmetic --------------------------------------------------------------
# Lane-wise ops: the SSE helper on zero-extended operands, low 64 bits kept.
_LANE = frozenset({
    M.PADDB, M.PADDW, M.PADDD, M.PADDQ, M.PSUBB, M.PSUBW, M.PSUBD, M.PSUBQ, M.PADDSB, M.PADDSW,
    M.PADDUSB, M.PADDUSW, M.PSUBSB, M.PSUBSW, M.PSUBUSB, M.PSUBUSW, M.PCMPEQB, M.PCMPEQW,
    M.PCMPEQD, M.PCMPGTB, M.PCMPGTW, M.PCMPGTD, M.PMULLW, M.PMULHW, M.PMULHUW, M.PMADDWD,
    M.PMULUDQ, M.PAVGB, M.PAVGW, M.PMINUB, M.PMAXUB, M.PMINSW, M.PMAXSW, M.PSADBW,
    M.PUNPCKLBW, M.PUNPCKLWD, M.PUNPCKLDQ})
# Packs put dst's lanes then src's: the 128-bit pack of dst | src << 64.
_PACKS = frozenset({M.PACKSSWB, M.PACKSSDW, M.PACKUSWB})
# High unpacks interleave the upper halves: the low unpack of both shifted down.
_UNPACK_HIGH = {M.PUNPCKHBW: M.PUNPCKLBW, M.PUNPCKHWD: M.PUNPCKLWD, M.PUNPCKHDQ: M.PUNPCKLDQ}
_LOGIC = {M.PAND: "{d} & {s}", M.POR: "{d} | {s}", M.PXOR: "{d} ^ {s}", M.PANDN: f"({{d}} ^ {M64:#x}) & {{s}}"}
_SHIFTS = {M.PSLLW: (2, 0), M.PSLLD: (4, 0), M.PSLLQ: (8, 0), M.PSRLW: (2, 1), M.PSRLD: (4, 1),
           M.PSRLQ: (8, 1), M.PSRAW: (2, 2), M.PSRAD: (4, 2)}


def _arith(g: Gen) -> None:
    _check(g)
    m = g.ins.mnemonic
    d = mreg(g, 0)
    g.emit("f = FPU(c)")
    s = _src(g, 1)
    if m in _PACKS:
        g.emit(f"t = P_{int(m)}(MMG(f, {d}) | {s} << 64, 0) & {M64:#x}")
    elif m in _UNPACK_HIGH:
        g.emit(f"t = P_{int(_UNPACK_HIGH[m])}(MMG(f, {d}) >> 32, {s} >> 32) & {M64:#x}")
    elif m in _LOGIC:
        g.emit("t = " + _LOGIC[m].format(d=f"MMG(f, {d})", s=s))
    else:
        g.emit(f"t = P_{int(m)}(MMG(f, {d}), {s}) & {M64:#x}")
    g.emit("f = MMX(c)")
    _set(g, d, "t")


def _shift(g: Gen) -> None:
    _check(g)
    w, kind = _SHIFTS[g.ins.mnemonic]
    d = mreg(g, 0)
    g.emit("f = FPU(c)")
    cnt = str(g.ins.immediate(1) & 0xFF) if g.is_imm(1) else _src(g, 1)
    g.emit(f"t = PSHIFT(MMG(f, {d}), {cnt}, {w}, {kind}) & {M64:#x}")
    g.emit("f = MMX(c)")
    _set(g, d, "t")


def _pshufw(g: Gen) -> None:
    _check(g)
    d = mreg(g, 0)
    g.emit("f = FPU(c)")
    s = _src(g, 1)
    g.emit(f"t = PSHUFLW({s}, {g.ins.immediate(2) & 0xFF}) & {M64:#x}")
    g.emit("f = MMX(c)")
    _set(g, d, "t")


def _pmovmskb(g: Gen) -> None:
    _check(g)
    g.emit(f"f = MMX(c); t = PMOVMSKB(MMG(f, {mreg(g, 1)}))")
    g.wreg(g.ins.op0_register, "t")


def _pextrw(g: Gen) -> None:
    _check(g)
    g.emit(f"f = MMX(c); t = MMG(f, {mreg(g, 1)}) >> {16 * (g.ins.immediate(2) & 3)} & 0xFFFF")
    g.wreg(g.ins.op0_register, "t")


def _pinsrw(g: Gen) -> None:
    _check(g)
    d = mreg(g, 0)
    pos = 16 * (g.ins.immediate(2) & 3)
    src = g.read(1, 2) if g.is_mem(1) else f"({g.read(1)} & 0xFFFF)"
    g.emit(f"w = {src}")
    g.emit(f"f = MMX(c); MMS(f, {d}, MMG(f, {d}) & {M64 ^ 0xFFFF << pos:#x} | w << {pos})")


# -- moves ------------------------------------------------------------------------------
def _mov(g: Gen) -> None:
    """movd/movq between MM and GPR/memory/MM, and movntq."""
    _check(g)
    size = 4 if g.ins.mnemonic == M.MOVD else 8
    if is_mm(g, 0):
        if is_mm(g, 1):
            g.emit(f"f = FPU(c); t = MMG(f, {mreg(g, 1)})")
        else:
            g.emit(f"t = {g.read(1, size)}")
        g.emit("f = MMX(c)")
        _set(g, mreg(g, 0), "t")
        return
    g.emit(f"f = FPU(c); t = MMG(f, {mreg(g, 1)}) & {MASK[size]:#x}")
    g.write(0, "t", size)
    g.emit("MMX(c)")


def _mov_xmm(g: Gen) -> None:
    """movq2dq xmm, mm and movdq2q mm, xmm (SSE2 checks, then the MMX transition)."""
    check_sse(g)
    if g.ins.mnemonic == M.MOVQ2DQ:
        g.emit(f"f = MMX(c); c.xmm[{xreg(g, 0)}] = MMG(f, {mreg(g, 1)})")
    else:
        g.emit(f"f = MMX(c); MMS(f, {mreg(g, 0)}, c.xmm[{xreg(g, 1)}] & {M64:#x})")


def _maskmovq(g: Gen) -> None:
    _check(g)
    ins = g.ins
    di = {OK.MEMORY_SEG_DI: Rg.DI, OK.MEMORY_SEG_EDI: Rg.EDI, OK.MEMORY_SEG_RDI: Rg.RDI}.get(ins.op0_kind)
    if di is None:
        raise Unsupported("maskmovq form")
    base = g.rreg(di)
    la = g.la(f"((b + i) & {MASK[X.RegisterInfo(di).size]:#x})", SEG_INDEX[ins.memory_segment])
    g.bind("SB")
    g.emit(f"b = {base}")
    g.emit(f"f = FPU(c); MASKMOVQ(c, f, lambda i: {la}, MMG(f, {mreg(g, 1)}), MMG(f, {mreg(g, 2)}), "
           f"{g.bind('wr1')})")
    g.emit("MMX(c)")


def _emms(g: Gen) -> None:
    _check(g)
    g.emit("EMMS_(c)")


MMX_EMITTERS = {m: _arith for m in _LANE | _PACKS | set(_UNPACK_HIGH) | set(_LOGIC)}
MMX_EMITTERS.update({m: _shift for m in _SHIFTS})
MMX_EMITTERS.update({M.PSHUFW: _pshufw, M.PMOVMSKB: _pmovmskb, M.PEXTRW: _pextrw, M.PINSRW: _pinsrw,
                     M.MOVD: _mov, M.MOVQ: _mov, M.MOVNTQ: _mov, M.MOVQ2DQ: _mov_xmm,
                     M.MOVDQ2Q: _mov_xmm, M.MASKMOVQ: _maskmovq, M.EMMS: _emms})
# Mnemonics only MMX has (no SSE twin to dispatch to).
_MMX_ONLY = frozenset({M.PSHUFW, M.MOVNTQ, M.MOVQ2DQ, M.MOVDQ2Q, M.MASKMOVQ, M.EMMS})


def _dispatch(sse_em, mmx_em):
    def em(g: Gen) -> None:
        (mmx_em if uses_mm(g) else sse_em)(g)
    return em


def merge(emitters: dict) -> None:
    """Routes the MMX forms of the table's SSE mnemonics here, in place."""
    for m, em in MMX_EMITTERS.items():
        if m in _MMX_ONLY or m not in emitters:
            emitters[m] = em
        else:
            emitters[m] = _dispatch(emitters[m], em)


EMITTERS: dict = {}   # registered through merge()
