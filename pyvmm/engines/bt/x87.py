"""x87 instructions: loads, stores, basic arithmetic, compares, FCMOVcc,
control and status words, and the registration of the environment
(x87env.py), transcendental (x87math.py) forms. Arithmetic is exact 80-bit
(x87arith.py); state: x87state.py.

Generated code raises GuestFault #NM (CR0.EM/TS) and memory faults, always
before changing FPU state."""

from __future__ import annotations

import math

import iced_x86 as X

from . import flags as F
from . import x87arith, x87env, x87math
from .gen import SEG_INDEX, Gen, Unsupported
from .ops import sx
from .x87arith import NOT_STORED, from_float_bits, is_denormal_float, to_float_bits
from .x87image import DE, PE, ZE, denormal, is_inf, is_nan, is_zero, unsupported
from .x87state import (C0, C1, C2, C3, CW_ONE, CW_WRITABLE, IE, INDEFINITE80, SF_, from80, fpu_of, to80,
                       x87_mf, x87_trap)

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


def mem_operand(f, v: int, size: int, integer: bool) -> int:
    """The exact 80-bit image of a memory operand (integer or binary32/64/80);
    f.src_denormal says whether a binary32/64 one was a denormal (the 80-bit
    image of which is normal, so the operation cannot tell)."""
    f.src_denormal = False
    if integer:
        return int_to80(sx(v, size))
    if size == 10:
        return v
    f.src_denormal = is_denormal_float(v, size)
    return from_float_bits(v, size)


def fld_mem(f, v: int, size: int, integer: bool) -> None:
    raw = mem_operand(f, v, size, integer)
    if size in (4, 8) and is_nan(raw) and not raw >> 62 & 1:
        f.sw |= IE          # a signalling NaN loads quietened
        raw |= 1 << 62
    if f.src_denormal and f.empty[(f.top - 1) & 7]:    # a stack overflow takes precedence
        f.sw |= DE
    f.push(from80(raw), raw)


def fld_st(f, i: int) -> None:
    """fld st(i): an empty source is a stack underflow (C1 = 0) even when
    the push overflows too; the indefinite NaN is pushed."""
    if f.empty[(f.top + i) & 7]:
        f.get(i)
        f.push(math.nan, INDEFINITE80)
        f.sw &= ~C1
    else:
        f.push(f.regs[(f.top + i) & 7], f.raw80(i))


def fst_float(f, size: int) -> int | None:
    """Bits of ST(0) as a float of `size` bytes, rounded under FCW.RC; an
    empty ST(0) stores the format's indefinite NaN (stack underflow).  None:
    an unmasked overflow or underflow keeps the store (and pop) from happening."""
    if f.empty[f.top]:
        f.get(0)
        return {4: 0xFFC00000, 8: 0xFFF8000000000000, 10: INDEFINITE80}[size]
    if size == 10:
        f.sw &= ~C1
        return f.raw80(0)
    v = to_float_bits(f, f.raw80(0), size)
    return None if v == NOT_STORED else v


def fist(f, size: int, trunc: bool) -> int:
    """ST(0) as an integer of `size` bytes (indefinite when out of range)."""
    indef = 1 << (8 * size - 1)
    f.sw &= ~C1
    if f.empty[f.top]:
        f.get(0)
        return indef
    b = f.raw80(0)
    exp, mant = b >> 64 & 0x7FFF, b & 0xFFFFFFFFFFFFFFFF
    if exp == 0x7FFF or unsupported(b):
        f.sw |= IE
        return indef
    sh = (exp or 1) - 16383 - 63
    if sh >= 0:
        v = mant << sh
    else:
        q, r = mant >> -sh, mant & ((1 << -sh) - 1)
        half = 1 << (-sh - 1)
        rc = 3 if trunc else f.cw >> 10 & 3
        neg = b >> 79 & 1
        up = r and (rc == 0 and (r > half or r == half and q & 1) or rc == 1 and neg or rc == 2 and not neg)
        if up:
            q += 1
        v = q
        if r and -indef <= (-v if neg else v) < indef:
            f.sw |= PE | (C1 if up else 0)      # inexact (not when out of range: IE instead)
    if b >> 79 & 1:
        v = -v
    if not -indef <= v < indef:
        f.sw |= IE
        return indef
    return v & ((1 << (8 * size)) - 1)


def _unmasked_pre(f, before: int) -> bool:
    """Whether this instruction raised an unmasked IE, DE or ZE (flags not
    set before it): the CPU then leaves its operands and the stack alone
    (no store, no pop) and #MF follows at the next waiting instruction."""
    return bool(f.sw & ~before & ~f.cw & (IE | DE | ZE))


def farith(f, op: int, dst: int, src: int, raw: int, pop: bool) -> None:
    """ST(dst) = ST(dst) op ST(src), or op raw (an 80-bit image) when src is
    -1; op numbers as in the x87 /r field. An empty register among them is a
    stack underflow: the result is the indefinite NaN."""
    before = f.sw
    if f.empty[(f.top + dst) & 7] or src >= 0 and f.empty[(f.top + src) & 7]:
        f.get(dst)
        if src >= 0:
            f.get(src)
        r = INDEFINITE80
    else:
        a = f.raw80(dst)
        b = f.raw80(src) if src >= 0 else raw
        if op in (5, 7):
            a, b = b, a
        if op == 0:
            r = x87arith.add(f, a, b)
        elif op == 1:
            r = x87arith.mul(f, a, b)
        elif op in (4, 5):
            r = x87arith.add(f, a, b, True)
        else:
            ze = f.sw & ZE
            r = x87arith.div(f, a, b)
            if not ze and f.sw & ZE:
                f.src_denormal = False        # a division by zero takes precedence over DE
        if src < 0:
            _memory_denormal(f, r, a, b)
    if _unmasked_pre(f, before):
        return
    f.put(dst, from80(r), r)
    if pop:
        f.pop()


def _memory_denormal(f, r: int, a: int, b: int) -> None:
    """DE for a denormal binary32/64 memory operand, unless the operation
    was invalid or had a NaN operand."""
    if f.src_denormal and r != INDEFINITE80 and not is_nan(a) and not is_nan(b):
        f.sw |= DE


def fcom(f, a: int, b: int, ordered: bool) -> int:
    """Condition bits C3 C2 C0 for comparing 80-bit a with b; IE for a
    signalling NaN, or any NaN when `ordered` (fcom, not fucom)."""
    r = x87arith.compare(a, b)
    if r is None:
        if ordered or any(is_nan(v) and not v >> 62 & 1 or unsupported(v) for v in (a, b)):
            f.sw |= IE
        return C3 | C2 | C0
    denormal(f, 0, a, b)
    return C3 if r == 0 else C0 if r < 0 else 0


def _pair(f, i: int) -> tuple[int, int] | None:
    """ST(0) and ST(i), or None after a stack underflow."""
    if f.empty[f.top] or f.empty[(f.top + i) & 7]:
        f.get(0)
        f.get(i)
        return None
    return f.raw80(0), f.raw80(i)


def fcom_set(f, i: int, raw: int, pops: int, ordered: bool) -> None:
    """fcom/fucom of ST(0) with ST(i), or with raw when i is -1."""
    before = f.sw
    ops = _pair(f, 0) if i < 0 else _pair(f, i)
    f.sw &= ~C1                 # fcom clears C1; fcomi leaves it (the CPU does)
    if ops is None:
        f.set_cc(C3 | C2 | C0)
    else:
        b = raw if i < 0 else ops[1]
        cc = fcom(f, ops[0], b, ordered)
        if i < 0:
            _memory_denormal(f, 0 if cc != C3 | C2 | C0 else INDEFINITE80, ops[0], b)
        f.set_cc(cc)
    if _unmasked_pre(f, before):
        return                  # the condition codes are set, but nothing is popped
    for _ in range(pops):
        f.pop()


def fcomi(f, i: int, pop: bool, ordered: bool) -> int:
    """RAW EFLAGS word (ZF PF CF) of fcomi st, st(i)."""
    ops = _pair(f, i)
    cc = C3 | C2 | C0 if ops is None else fcom(f, ops[0], ops[1], ordered)
    if pop:
        f.pop()
    return (F.ZF if cc & C3 else 0) | (F.PF if cc & C2 else 0) | (F.CF if cc & C0 else 0)


def fxam(f) -> None:
    """Classifies ST(0) from its 80-bit image (C1 = its sign)."""
    b = f.raw[f.top]
    b = b if b is not None else to80(f.regs[f.top])
    sign = C1 if b >> 79 else 0
    exp = b >> 64 & 0x7FFF
    if f.empty[f.top]:
        f.set_cc(C3 | C0 | sign)
    elif unsupported(b):
        f.set_cc(sign)
    elif is_nan(b):
        f.set_cc(C0 | sign)
    elif is_inf(b):
        f.set_cc(C2 | C0 | sign)
    elif is_zero(b):
        f.set_cc(C3 | sign)
    elif exp == 0:
        f.set_cc(C3 | C2 | sign)     # denormal
    else:
        f.set_cc(C2 | sign)


def funary(f, m: int) -> None:
    if f.empty[f.top]:
        f.get(0)
        if m == M.FTST:
            f.set_cc(C3 | C2 | C0)
        else:
            f.put(0, math.nan, INDEFINITE80)
        return
    b = f.raw80(0)
    before = f.sw
    if m == M.FCHS:
        r = b ^ (1 << 79)
        f.sw &= ~C1
    elif m == M.FABS:
        r = b & ~(1 << 79)
        f.sw &= ~C1
    elif m == M.FSQRT:
        r = x87arith.sqrt(f, b)
    elif m == M.FRNDINT:
        r = x87arith.round_int(f, b)
    else:   # FTST
        f.set_cc(fcom(f, b, 0, True))
        return
    if _unmasked_pre(f, before):
        return
    f.put(0, from80(r), r)


def fcmov(f, i: int, cond: bool) -> None:
    """An empty ST(0) or ST(i) is a stack underflow whatever the condition:
    ST(0) becomes the indefinite NaN."""
    if f.empty[f.top] or f.empty[(f.top + i) & 7]:
        f.get(0) if f.empty[f.top] else f.get(i)
        f.put(0, math.nan, INDEFINITE80)
    elif cond:
        f.put(0, f.get(i), f.raw80(i))


def fxch(f, i: int) -> None:
    """An empty register among the two is a stack underflow: it becomes the
    indefinite NaN, then they are exchanged."""
    a, b = (f.top) & 7, (f.top + i) & 7
    if f.empty[a] or f.empty[b]:
        for p in (a, b):
            if f.empty[p]:
                f.regs[p], f.raw[p], f.empty[p] = math.nan, INDEFINITE80, False
        f.sw = (f.sw | IE | SF_) & ~C1
    for lst in (f.regs, f.raw, f.empty):
        lst[a], lst[b] = lst[b], lst[a]
    f.sw &= ~C1


EXPORTS = {"FPU": fpu_of, "X87_TRAP": x87_trap, "X87_MF": x87_mf, "FLD_MEM": fld_mem, "FST_FLOAT": fst_float,
           "FIST": fist, "FARITH": farith, "FCOM_SET": fcom_set, "FCOMI": fcomi, "FXAM": fxam,
           "FUNARY": funary, "FXCH": fxch, "FCMOV": fcmov, "FLD_ST": fld_st}
EXPORTS.update(x87env.EXPORTS)
EXPORTS.update(x87math.EXPORTS)


# -- emitters ---------------------------------------------------------------------------
def _pre(g: Gen, waits: bool = True, control: bool = False) -> None:
    g.fault()
    g.bind("c")
    g.emit("if c.cr0 & 0xC: X87_TRAP(c)")
    if waits:
        g.emit("X87_MF(c)")        # a pending unmasked exception: #MF first
    if not control:
        _pointers(g)


def _pointers(g: Gen) -> None:
    """Records FIP/FCS, FOP and (with a memory operand) FDP/FDS, as a
    non-control x87 instruction does (x87state.Fpu.init)."""
    ins = g.ins
    enc = X.Encoder(g.bits)
    enc.encode(ins, ins.ip)
    raw = enc.take_buffer()
    at = next(i for i, b in enumerate(raw) if 0xD8 <= b <= 0xDF)
    fop = (raw[at] & 7) << 8 | raw[at + 1]
    g.emit(f"_f = FPU(c); _f.fip = {ins.ip:#x}; _f.fcs = c.seg[1].selector; _f.fop = {fop:#x}")
    if any(ins.op_kind(i) == X.OpKind.MEMORY for i in range(ins.op_count)):
        seg = SEG_INDEX[ins.memory_segment]
        g.emit(f"_f.fdp = {g.ea()}; _f.fds = c.seg[{seg}].selector")


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
        g.emit(f"FLD_ST(FPU(c), {i})")


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
        elif size in (4, 8) and m in (M.FST, M.FSTP):
            g.emit("if v is not None:")      # None: an unmasked OE/UE stores nothing, pops nothing
            g.ind += 1
            g.wmem(size, "v")
            if pop:
                g.emit("f.pop()")
            g.ind -= 1
            return
        else:
            g.wmem(size, "v")
    else:
        i = _sti(g, 0)
        g.emit(f"f.put({i}, f.get(0), f.raw80(0)); f.sw &= {~C1 & 0xFFFF:#x}")
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
    return f"MEM_OPERAND(FPU(c), {v}, {size}, {integer})"


def _farith(g: Gen) -> None:
    m = g.ins.mnemonic
    op = _ARITH[m]
    if g.is_mem(0):
        _pre(g)
        g.emit(f"s = {_mem_value(g, m in _INT_OPS)}")
        g.emit(f"FARITH(FPU(c), {op}, 0, -1, s, False)")
        return
    _pre(g)
    if g.ins.op_count == 2:
        d, s = _sti(g, 0), _sti(g, 1)
    else:
        d, s = 1, 0
    g.emit(f"FARITH(FPU(c), {op}, {d}, {s}, 0, {m in _POPS})")


def _fcom(g: Gen) -> None:
    m = g.ins.mnemonic
    pops = {M.FCOMP: 1, M.FUCOMP: 1, M.FCOMPP: 2, M.FUCOMPP: 2, M.FICOMP: 1}.get(m, 0)
    ordered = m not in (M.FUCOM, M.FUCOMP, M.FUCOMPP)      # fucom: IE for signalling NaNs only
    if g.is_mem(0):
        _pre(g)
        g.emit(f"s = {_mem_value(g, m in (M.FICOM, M.FICOMP))}")
        g.emit(f"FCOM_SET(FPU(c), -1, s, {pops}, {ordered})")
        return
    _pre(g)
    i = _sti(g, g.ins.op_count - 1) if g.ins.op_count else 1
    g.emit(f"FCOM_SET(FPU(c), {i}, 0, {pops}, {ordered})")


def _fcomi(g: Gen) -> None:
    _pre(g)
    pop = g.ins.mnemonic in (M.FCOMIP, M.FUCOMIP)
    ordered = g.ins.mnemonic in (M.FCOMI, M.FCOMIP)
    g.emit(f"t = FCOMI(FPU(c), {_sti(g, 1)}, {pop}, {ordered})")
    g.set_flags(F.RAW, 8, "t")


_FCMOV_CC = {M.FCMOVB: 2, M.FCMOVNB: 3, M.FCMOVE: 4, M.FCMOVNE: 5, M.FCMOVBE: 6, M.FCMOVNBE: 7,
             M.FCMOVU: 10, M.FCMOVNU: 11}


def _fcmov(g: Gen) -> None:
    """ST(0) = ST(i) when the EFLAGS condition holds."""
    _pre(g)
    i = _sti(g, 1)
    g.emit(f"FCMOV(FPU(c), {i}, {g.cond(_FCMOV_CC[g.ins.mnemonic])})")


_MATH = {M.FSIN: "FTRIG(f, 'fsin')", M.FCOS: "FTRIG(f, 'fcos')", M.FSINCOS: "FTRIG(f, 'fsincos')",
         M.FPTAN: "FTRIG(f, 'fptan')", M.FPATAN: "FPATAN(f)", M.F2XM1: "F2XM1(f)",
         M.FYL2X: "FYL2X(f, False)", M.FYL2XP1: "FYL2X(f, True)", M.FPREM: "FPREM(f, False)",
         M.FPREM1: "FPREM(f, True)", M.FSCALE: "FSCALE(f)", M.FXTRACT: "FXTRACT(f)"}


def _fmath(g: Gen) -> None:
    """Transcendental, remainder and scaling forms (x87math.py)."""
    _pre(g)
    g.emit(f"f = FPU(c); {_MATH[g.ins.mnemonic]}")


# The control forms that do not check for a pending exception (the FWAIT
# of FINIT, FSTSW... decodes as an instruction of its own).
_NO_WAIT = frozenset({M.FNINIT, M.FNCLEX, M.FNSTCW, M.FNSTSW, M.FNSTENV, M.FNSAVE})
# The control instructions, which leave FIP/FDP/FOP alone (SDM Vol. 1, 8.1.8).
_CONTROL = _NO_WAIT | {M.FLDCW, M.FLDENV, M.FRSTOR}
_ENV_FORMS = {M.FNSTENV: "FNSTENV", M.FSTENV: "FNSTENV", M.FLDENV: "FLDENV", M.FNSAVE: "FNSAVE",
              M.FSAVE: "FNSAVE", M.FRSTOR: "FRSTOR"}


def _fctl(g: Gen) -> None:
    m = g.ins.mnemonic
    if m == M.WAIT:
        g.fault()
        g.bind("c")
        g.emit("if c.cr0 & 0xA == 0xA: X87_TRAP(c, True)")
        g.emit("X87_MF(c)")
        return
    if m == M.FLDCW:
        _pre(g, control=True)
        g.addr()
        g.emit(f"FPU(c).cw = {g.rmem(2)} & {CW_WRITABLE:#x} | {CW_ONE:#x}")
        return
    _pre(g, waits=m not in _NO_WAIT, control=m in _CONTROL)
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
    elif m in (M.FFREE, M.FFREEP):
        g.emit(f"f = FPU(c); f.empty[(f.top + {_sti(g, 0)}) & 7] = True; f.sw &= {~C1 & 0xFFFF:#x}")
        if m == M.FFREEP:
            g.emit("f.pop()")
    elif m == M.FINCSTP:
        g.emit(f"f = FPU(c); f.top = (f.top + 1) & 7; f.sw &= {~C1 & 0xFFFF:#x}")
    elif m == M.FDECSTP:
        g.emit(f"f = FPU(c); f.top = (f.top - 1) & 7; f.sw &= {~C1 & 0xFFFF:#x}")
    elif m in _ENV_FORMS:
        g.addr()
        g.helper(f"{_ENV_FORMS[m]}(c, FPU(c), a, {_msize(g)})")
    elif m == M.FNOP:
        pass
    else:
        raise Unsupported("x87 control")


EMITTERS = {M.FLD: _fld, M.FILD: _fld, M.FST: _fst, M.FSTP: _fst, M.FIST: _fst, M.FISTP: _fst,
            M.FISTTP: _fst}
EMITTERS.update({m: _fld for m in _CONST})
EMITTERS.update({m: _farith for m in _ARITH})
EMITTERS.update({m: _fcom for m in (M.FCOM, M.FCOMP, M.FCOMPP, M.FUCOM, M.FUCOMP, M.FUCOMPP, M.FICOM,
                                     M.FICOMP)})
EMITTERS.update({m: _fcomi for m in (M.FCOMI, M.FCOMIP, M.FUCOMI, M.FUCOMIP)})
EMITTERS.update({m: _fctl for m in (
    M.WAIT, M.FLDCW, M.FNINIT, M.FINIT, M.FNCLEX, M.FCLEX, M.FNSTCW, M.FSTCW, M.FNSTSW, M.FSTSW,
    M.FXAM, M.FCHS, M.FABS, M.FSQRT, M.FRNDINT, M.FTST, M.FXCH, M.FFREE, M.FFREEP, M.FINCSTP, M.FDECSTP,
    M.FNOP) + tuple(_ENV_FORMS)})
EMITTERS.update({m: _fcmov for m in _FCMOV_CC})
EMITTERS.update({m: _fmath for m in _MATH})
EXPORTS["MEM_OPERAND"] = mem_operand
