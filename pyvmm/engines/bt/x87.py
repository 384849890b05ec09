"""x87 instructions: loads, stores, basic arithmetic, compares, control
and status words, fnstenv/fldenv. State and precision limits: x87state.py.

Generated code raises GuestFault #NM (CR0.EM/TS) and memory faults, always
before changing FPU state."""

from __future__ import annotations

import math
import struct

import iced_x86 as X

from . import flags as F
from .gen import Gen, Unsupported
from .ops import sx
from .ssefp import from_float, to_float
from .x87state import C0, C1, C2, C3, IE, INDEFINITE80, from80, fpu_of, x87_trap

M = X.Mnemonic
Rg = X.Register
# 80-bit images of the constants (round to nearest, the reset rounding mode).
_CONST = {M.FLD1: 0x3FFF8000000000000000, M.FLDZ: 0, M.FLDPI: 0x4000C90FDAA22168C235,
          M.FLDL2E: 0x3FFFB8AA3B295C17F0BC, M.FLDL2T: 0x4000D49A784BCD1B8AFE,
          M.FLDLG2: 0x3FFD9A209A84FBCFF799, M.FLDLN2: 0x3FFEB17217F7D1CF79AC}


# -- runtime helpers --------------------------------------------------------------
def int_to80(v: int) -> int:
    """Exact 80-bit image of an integer of up to 64 bits."""
    if v == 0:
        return 0
    sign = 1 << 79 if v < 0 else 0
    a = abs(v)
    n = a.bit_length()
    return sign | (16383 + n - 1) << 64 | (a << (64 - n))


def fld_mem(f, v: int, size: int, integer: bool) -> None:
    if integer:
        v = sx(v, size)
        f.push(float(v), int_to80(v))
    elif size == 10:
        f.push(from80(v), v)
    else:
        f.push(to_float(v, size))


def fst_float(f, size: int) -> int:
    """Bits of ST(0) as a float of `size` bytes."""
    if size == 10:
        return f.raw80(0)
    x = f.get(0)
    if x != x:
        return 0xFFF8000000000000 if size == 8 else 0xFFC00000
    return from_float(x, size)


def fist(f, size: int, trunc: bool) -> int:
    """ST(0) as an integer of `size` bytes (indefinite when out of range)."""
    indef = 1 << (8 * size - 1)
    b = f.raw80(0)
    exp, mant = b >> 64 & 0x7FFF, b & 0xFFFFFFFFFFFFFFFF
    if exp == 0x7FFF:
        f.sw |= IE
        return indef
    sh = exp - 16383 - 63
    if sh >= 0:
        v = mant << sh
    else:
        q, r = mant >> -sh, mant & ((1 << -sh) - 1)
        half = 1 << (-sh - 1)
        rc = 3 if trunc else f.cw >> 10 & 3
        neg = b >> 79 & 1
        if r and (rc == 0 and (r > half or r == half and q & 1) or rc == 1 and neg or rc == 2 and not neg):
            q += 1
        v = q
    if b >> 79 & 1:
        v = -v
    if not -indef <= v < indef:
        f.sw |= IE
        return indef
    return v & ((1 << (8 * size)) - 1)


def farith(f, op: int, dst: int, src: float, pop: bool) -> None:
    """ST(dst) = ST(dst) op src; op numbers as in the x87 /r field."""
    a = f.get(dst)
    if op in (5, 7):
        a, src = src, a
    if op == 0:
        r = a + src
    elif op == 1:
        r = a * src
    elif op in (4, 5):
        r = a - src
    elif src == 0.0:
        r = math.nan if a == 0.0 or a != a else math.copysign(math.inf, a) * math.copysign(1.0, src)
    else:
        r = a / src
    if r != r:
        f.put(dst, r, INDEFINITE80 if a == a and src == src else None)
    else:
        f.put(dst, r)
    if pop:
        f.pop()


def fcom(f, a: float, b: float) -> int:
    """Condition bits C3 C2 C0 for comparing a with b."""
    if a != a or b != b:
        return C3 | C2 | C0
    return C3 if a == b else C0 if a < b else 0


def fcom_set(f, b: float, pops: int) -> None:
    f.set_cc(fcom(f, f.get(0), b))
    for _ in range(pops):
        f.pop()


def fcomi(f, i: int, pop: bool) -> int:
    """RAW EFLAGS word (ZF PF CF) of fcomi st, st(i)."""
    cc = fcom(f, f.get(0), f.get(i))
    if pop:
        f.pop()
    return (F.ZF if cc & C3 else 0) | (F.PF if cc & C2 else 0) | (F.CF if cc & C0 else 0)


def fxam(f) -> None:
    p = f.top
    x = f.regs[p]
    sign = C1 if math.copysign(1.0, x) < 0 else 0
    if f.empty[p]:
        f.set_cc(C3 | C0 | sign)
    elif x != x:
        f.set_cc(C0 | sign)
    elif math.isinf(x):
        f.set_cc(C2 | C0 | sign)
    elif x == 0:
        f.set_cc(C3 | sign)
    else:
        f.set_cc(C2 | sign)


def funary(f, m: int) -> None:
    x = f.get(0)
    if m == M.FCHS:
        f.put(0, -x, f.raw80(0) ^ (1 << 79))
    elif m == M.FABS:
        f.put(0, abs(x), f.raw80(0) & ~(1 << 79))
    elif m == M.FSQRT:
        f.put(0, math.sqrt(x) if x >= 0 or x != x else math.nan)
    elif m == M.FRNDINT:
        f.put(0, math.copysign(float(f.round_int(x)), x) if math.isfinite(x) else x)
    elif m == M.FTST:
        f.set_cc(fcom(f, x, 0.0))


def fxch(f, i: int) -> None:
    a, b = (f.top) & 7, (f.top + i) & 7
    for lst in (f.regs, f.raw, f.empty):
        lst[a], lst[b] = lst[b], lst[a]


_ENV = struct.Struct("<7I")


def fnstenv(c, f, a: int) -> None:
    """28-byte protected-mode environment (32-bit layout); masks exceptions."""
    tw = sum((3 if f.empty[i] else 0) << (2 * i) for i in range(8))
    data = _ENV.pack(f.cw | 0xFFFF0000, f.status() | 0xFFFF0000, tw | 0xFFFF0000, 0, 0, 0, 0xFFFF0000)
    for i in range(0, 28, 4):
        c.wr(a + i, 4, int.from_bytes(data[i:i + 4], "little"))
    f.cw |= 0x3F


def fldenv(c, f, a: int) -> None:
    vals = [c.rd(a + 4 * i, 4) for i in range(3)]
    f.cw, sw, tw = vals[0] & 0xFFFF, vals[1] & 0xFFFF, vals[2] & 0xFFFF
    f.sw, f.top = sw & ~0x3800, sw >> 11 & 7
    f.empty = [(tw >> (2 * i) & 3) == 3 for i in range(8)]


EXPORTS = {"FPU": fpu_of, "X87_TRAP": x87_trap, "FLD_MEM": fld_mem, "FST_FLOAT": fst_float,
           "FIST": fist, "FARITH": farith, "FCOM_SET": fcom_set, "FCOMI": fcomi, "FXAM": fxam,
           "FUNARY": funary, "FXCH": fxch, "FNSTENV": fnstenv, "FLDENV": fldenv}


# -- emitters ---------------------------------------------------------------------------
def _pre(g: Gen) -> None:
    g.fault()
    g.bind("c")
    g.emit("if c.cr0 & 0xC: X87_TRAP(c)")


def _sti(g: Gen, i: int) -> int:
    r = g.ins.op_register(i)
    if not Rg.ST0 <= r <= Rg.ST7:
        raise Unsupported("x87 register")
    return r - Rg.ST0


def _msize(g: Gen) -> int:
    return X.MemorySizeInfo(g.ins.memory_size).size


def _fld(g: Gen) -> None:
    m = g.ins.mnemonic
    if m in _CONST:
        _pre(g)
        g.emit(f"FPU(c).push({from80(_CONST[m])!r}, {_CONST[m]:#x})")
    elif g.is_mem(0):
        size = _msize(g)
        _pre(g)
        g.addr()
        if size == 10:
            v = f"{g.rmem(8)} | {g.rmem(2, '((a + 8) & 0xFFFFFFFFFFFFFFFF)')} << 64"
        else:
            v = g.rmem(size)
        g.emit(f"FLD_MEM(FPU(c), {v}, {size}, {m == M.FILD})")
    else:
        _pre(g)
        i = _sti(g, 0)
        g.emit(f"f = FPU(c); f.push(f.get({i}), f.raw80({i}))")


def _fst(g: Gen) -> None:
    m = g.ins.mnemonic
    pop = m in (M.FSTP, M.FISTP, M.FISTTP)
    _pre(g)
    g.emit("f = FPU(c)")
    if g.is_mem(0):
        size = _msize(g)
        if m in (M.FIST, M.FISTP, M.FISTTP):
            g.emit(f"v = FIST(f, {size}, {m == M.FISTTP})")
        else:
            g.emit(f"v = FST_FLOAT(f, {size})")
        g.addr()
        if size == 10:
            g.wmem(8, "v & 0xFFFFFFFFFFFFFFFF")
            g.wmem(2, "v >> 64", "((a + 8) & 0xFFFFFFFFFFFFFFFF)")
        else:
            g.wmem(size, "v")
    else:
        i = _sti(g, 0)
        g.emit(f"f.put({i}, f.get(0), f.raw80(0))")
    if pop:
        g.emit("f.pop()")


_ARITH = {M.FADD: 0, M.FADDP: 0, M.FIADD: 0, M.FMUL: 1, M.FMULP: 1, M.FIMUL: 1, M.FSUB: 4,
          M.FSUBP: 4, M.FISUB: 4, M.FSUBR: 5, M.FSUBRP: 5, M.FISUBR: 5, M.FDIV: 6, M.FDIVP: 6,
          M.FIDIV: 6, M.FDIVR: 7, M.FDIVRP: 7, M.FIDIVR: 7}
_INT_OPS = {M.FIADD, M.FIMUL, M.FISUB, M.FISUBR, M.FIDIV, M.FIDIVR}
_POPS = {M.FADDP, M.FMULP, M.FSUBP, M.FSUBRP, M.FDIVP, M.FDIVRP}


def _mem_value(g: Gen, integer: bool) -> str:
    size = _msize(g)
    g.addr()
    v = g.rmem(size)
    return f"float(SX({v}, {size}))" if integer else f"TO_FLOAT({v}, {size})"


def _farith(g: Gen) -> None:
    m = g.ins.mnemonic
    op = _ARITH[m]
    if g.is_mem(0):
        _pre(g)
        g.emit(f"s = {_mem_value(g, m in _INT_OPS)}")
        g.emit(f"FARITH(FPU(c), {op}, 0, s, False)")
        return
    _pre(g)
    if g.ins.op_count == 2:
        d, s = _sti(g, 0), _sti(g, 1)
    else:
        d, s = 1, 0
    g.emit(f"f = FPU(c); FARITH(f, {op}, {d}, f.get({s}), {m in _POPS})")


def _fcom(g: Gen) -> None:
    m = g.ins.mnemonic
    pops = {M.FCOMP: 1, M.FUCOMP: 1, M.FCOMPP: 2, M.FUCOMPP: 2}.get(m, 0)
    if g.is_mem(0):
        _pre(g)
        g.emit(f"s = {_mem_value(g, False)}")
        g.emit(f"FCOM_SET(FPU(c), s, {pops})")
        return
    _pre(g)
    i = _sti(g, g.ins.op_count - 1) if g.ins.op_count else 1
    g.emit(f"f = FPU(c); FCOM_SET(f, f.get({i}), {pops})")


def _fcomi(g: Gen) -> None:
    _pre(g)
    pop = g.ins.mnemonic in (M.FCOMIP, M.FUCOMIP)
    g.emit(f"t = FCOMI(FPU(c), {_sti(g, 1)}, {pop})")
    g.set_flags(F.RAW, 8, "t")


def _fctl(g: Gen) -> None:
    m = g.ins.mnemonic
    if m == M.WAIT:
        g.fault()
        g.bind("c")
        g.emit("if c.cr0 & 0xA == 0xA: X87_TRAP(c, True)")
        return
    if m == M.FLDCW:
        _pre(g)
        g.addr()
        g.emit(f"FPU(c).cw = {g.rmem(2)}")
        return
    _pre(g)
    if m in (M.FNINIT, M.FINIT):
        g.emit("FPU(c).init()")
    elif m in (M.FNCLEX, M.FCLEX):
        g.emit("f = FPU(c); f.sw &= 0x7F00")
    elif m in (M.FNSTCW, M.FSTCW):
        g.write(0, "FPU(c).cw", 2)
    elif m in (M.FNSTSW, M.FSTSW):
        g.write(0, "FPU(c).status()", 2)
    elif m == M.FXAM:
        g.emit("FXAM(FPU(c))")
    elif m in (M.FCHS, M.FABS, M.FSQRT, M.FRNDINT, M.FTST):
        g.emit(f"FUNARY(FPU(c), {int(m)})")
    elif m == M.FXCH:
        g.emit(f"FXCH(FPU(c), {_sti(g, g.ins.op_count - 1) if g.ins.op_count else 1})")
    elif m == M.FFREE:
        g.emit(f"f = FPU(c); f.empty[(f.top + {_sti(g, 0)}) & 7] = True")
    elif m == M.FINCSTP:
        g.emit("f = FPU(c); f.top = (f.top + 1) & 7")
    elif m == M.FDECSTP:
        g.emit("f = FPU(c); f.top = (f.top - 1) & 7")
    elif m in (M.FNSTENV, M.FSTENV, M.FLDENV):
        g.addr()
        fn = "FLDENV" if m == M.FLDENV else "FNSTENV"
        g.helper(f"{fn}(c, FPU(c), a)")
    elif m == M.EMMS:
        g.emit("f = FPU(c); f.empty = [True] * 8")
    elif m == M.FNOP:
        pass
    else:
        raise Unsupported("x87 control")


EMITTERS = {M.FLD: _fld, M.FILD: _fld, M.FST: _fst, M.FSTP: _fst, M.FIST: _fst, M.FISTP: _fst,
            M.FISTTP: _fst}
EMITTERS.update({m: _fld for m in _CONST})
EMITTERS.update({m: _farith for m in _ARITH})
EMITTERS.update({m: _fcom for m in (M.FCOM, M.FCOMP, M.FCOMPP, M.FUCOM, M.FUCOMP, M.FUCOMPP)})
EMITTERS.update({m: _fcomi for m in (M.FCOMI, M.FCOMIP, M.FUCOMI, M.FUCOMIP)})
EMITTERS.update({m: _fctl for m in (
    M.WAIT, M.FLDCW, M.FNINIT, M.FINIT, M.FNCLEX, M.FCLEX, M.FNSTCW, M.FSTCW, M.FNSTSW, M.FSTSW,
    M.FXAM, M.FCHS, M.FABS, M.FSQRT, M.FRNDINT, M.FTST, M.FXCH, M.FFREE, M.FINCSTP, M.FDECSTP,
    M.FNSTENV, M.FSTENV, M.FLDENV, M.EMMS, M.FNOP)})
EXPORTS["TO_FLOAT"] = to_float
