"""Integer ALU semantics: emitters that generate code for one instruction,
generic over operand size."""

from __future__ import annotations

import iced_x86 as X

from . import flags as F
from .facts import Fact
from .gen import GPR, MASK, SEG_INDEX, SIGN, Gen, Unsupported

M = X.Mnemonic
Rg = X.Register


def _binop(g: Gen) -> None:
    m = g.ins.mnemonic
    size = g.size(0)
    mk = MASK[size]
    x = g.read(0)
    if m in (M.XOR, M.SUB, M.SBB) and g.is_reg(0) and g.is_reg(1) and g.ins.op0_register == g.ins.op1_register:
        y = x
    else:
        y = g.read(1, size)
    if not g.flags_live and m not in (M.ADC, M.SBB):
        # dead flags: one statement, no temporaries
        if m in (M.CMP, M.TEST):
            return
        if m == M.XOR and y is x:
            g.write(0, "0")
            return
        op = {M.ADD: "+", M.SUB: "-", M.AND: "&", M.OR: "|", M.XOR: "^"}[m]
        g.write(0, f"({x} {op} {y}) & {mk:#x}" if m in (M.ADD, M.SUB) else f"{x} {op} {y}")
        return
    if m not in (M.ADC, M.SBB) and (g.is_reg(0) or m in (M.CMP, M.TEST)):
        _binop_direct(g, m, size, x, y)
        return
    g.emit(f"x = {x}; y = {y}")
    if m in (M.ADD, M.ADC):
        g.emit(f"t = x + y" + (f" + {g.carry_expr()}" if m == M.ADC else ""))
        g.write(0, f"t & {mk:#x}")
        g.set_flags(F.ADD, size, "t", "x", "y")
    elif m in (M.SUB, M.SBB, M.CMP):
        g.emit(f"t = x - y" + (f" - {g.carry_expr()}" if m == M.SBB else ""))
        if m != M.CMP:
            g.write(0, f"t & {mk:#x}")
        g.set_flags(F.SUB, size, "t", "x", "y", pure=m != M.SBB)
    else:
        op = {M.AND: "&", M.OR: "|", M.XOR: "^", M.TEST: "&"}[m]
        g.emit(f"t = x {op} y")
        if m != M.TEST:
            g.write(0, "t")
        g.set_flags(F.LOGIC, size, "t")


def _binop_direct(g: Gen, m: int, size: int, x: str, y: str) -> None:
    """Live flags, no store after the flags are written (so no fault can
    see a half-updated state): computes straight into fo/fr/fa/fb, without
    temporaries.  LOGIC leaves fa/fb alone (no reader of a LOGIC state uses
    them)."""
    mk = MASK[size]
    if m in (M.ADD, M.SUB, M.CMP):
        add = m == M.ADD
        g.emit(f"fa = {x}; fb = {y}; fr = fa {'+' if add else '-'} fb")
        if m != M.CMP:
            g.write(0, f"fr & {mk:#x}")
        g.lazy = (F.ADD if add else F.SUB, size, not add)
        g.emit(f"fo = {F.op(F.ADD if add else F.SUB, size)}")
        return
    if m == M.XOR and y is x:
        g.write(0, "0")
        g.emit(f"fo = {F.op(F.LOGIC, size)}; fr = 0")
    else:
        op = {M.AND: "&", M.OR: "|", M.XOR: "^", M.TEST: "&"}[m]
        g.emit(f"fr = {x} {op} {y}")
        if m != M.TEST:
            g.write(0, "fr")
        g.emit(f"fo = {F.op(F.LOGIC, size)}")
    g.lazy = (F.LOGIC, size, False)


def _incdec(g: Gen) -> None:
    size = g.size(0)
    inc = g.ins.mnemonic == M.INC
    if g.flags_live and g.is_reg(0):
        # the carry is read from the old state before fb is overwritten
        g.emit(f"fb = {g.carry_expr()}; fa = {g.read(0)}; fr = fa {'+' if inc else '-'} 1")
        g.write(0, f"fr & {MASK[size]:#x}")
        g.emit(f"fo = {F.op(F.INC if inc else F.DEC, size)}")
        g.lazy = (F.INC if inc else F.DEC, size, False)
        return
    g.emit(f"x = {g.read(0)}; cf = {g.carry_expr()}")
    g.emit(f"t = x {'+' if inc else '-'} 1")
    g.write(0, f"t & {MASK[size]:#x}")
    g.set_flags(F.INC if inc else F.DEC, size, "t", "x", "cf")


def _neg(g: Gen) -> None:
    size = g.size(0)
    g.emit(f"x = {g.read(0)}; t = -x")
    g.write(0, f"t & {MASK[size]:#x}")
    g.set_flags(F.SUB, size, "t", "0", "x")


def _not(g: Gen) -> None:
    size = g.size(0)
    g.emit(f"t = {g.read(0)} ^ {MASK[size]:#x}")
    g.write(0, "t")


def _mov(g: Gen) -> None:
    if g.is_reg(0) and g.ins.op0_register not in GPR or g.is_reg(1) and g.ins.op1_register not in GPR:
        raise Unsupported("mov with special register")
    size = g.size(0)
    g.write(0, g.read(1, size))


def _movzx(g: Gen) -> None:
    g.write(0, g.read(1))


def _movsx(g: Gen) -> None:
    s1, s0 = g.size(1), g.size(0)
    g.emit(f"t = {g.read(1)}")
    if s1 < s0:
        g.emit(f"t = ((t ^ {SIGN[s1]:#x}) - {SIGN[s1]:#x}) & {MASK[s0]:#x}")
    g.write(0, "t")


def _lea(g: Gen) -> None:
    ea, size = g.ea(), g.size(0)
    # ea() is already masked to the address size: a destination at least
    # that wide needs no second mask
    g.write(0, ea if MASK[size] >= MASK[g.ea_size] else f"({ea}) & {MASK[size]:#x}")


def _xchg(g: Gen) -> None:
    size = g.size(0)
    g.emit(f"x = {g.read(0)}; y = {g.read(1, size)}")
    if g.is_mem(1):
        g.write(1, "x")
        g.write(0, "y")
    else:
        g.write(0, "y")
        g.write(1, "x")


def _xadd(g: Gen) -> None:
    size = g.size(0)
    g.emit(f"x = {g.read(0)}; y = {g.read(1)}; t = x + y")
    if g.is_mem(0):
        g.write(0, f"t & {MASK[size]:#x}")
        g.write(1, "x")
    else:
        g.write(1, "x")
        g.write(0, f"t & {MASK[size]:#x}")
    g.set_flags(F.ADD, size, "t", "x", "y")


def _cmpxchg(g: Gen) -> None:
    size = g.size(0)
    acc = {1: Rg.AL, 2: Rg.AX, 4: Rg.EAX, 8: Rg.RAX}[size]
    g.emit(f"x = {g.rreg(acc)}; y = {g.read(0)}; s = {g.read(1)}; t = x - y")
    g.emit("if t == 0:")
    g.ind += 1
    g.write(0, "s")
    g.ind -= 1
    g.emit("else:")
    g.ind += 1
    if g.is_mem(0):
        g.write(0, "y")  # the locked cycle writes the old value back
    # a register destination is left alone (no zero-extension)
    g.wreg(acc, "y")
    g.ind -= 1
    g.set_flags(F.SUB, size, "t", "x", "y", pure=True)


def _setcc(g: Gen) -> None:
    g.write(0, f"(1 if {g.cond(g.ins.condition_code - 1)} else 0)")


def _cmovcc(g: Gen) -> None:
    size = g.size(0)
    src = g.read(1)
    g.emit(f"t = {src} if {g.cond(g.ins.condition_code - 1)} else {g.rreg(g.ins.op0_register)}")
    g.write(0, "t", size)


def _cbw(g: Gen) -> None:
    m = g.ins.mnemonic
    src, dst, s = {M.CBW: (Rg.AL, Rg.AX, 1), M.CWDE: (Rg.AX, Rg.EAX, 2),
                   M.CDQE: (Rg.EAX, Rg.RAX, 4)}[m]
    g.wreg(dst, f"(({g.rreg(src)} ^ {SIGN[s]:#x}) - {SIGN[s]:#x}) & {MASK[s * 2]:#x}")


def _cwd(g: Gen) -> None:
    src, dst, s = {M.CWD: (Rg.AX, Rg.DX, 2), M.CDQ: (Rg.EAX, Rg.EDX, 4),
                   M.CQO: (Rg.RAX, Rg.RDX, 8)}[g.ins.mnemonic]
    g.wreg(dst, f"({MASK[s]:#x} if {g.rreg(src)} & {SIGN[s]:#x} else 0)")


def _acc(size: int):
    return {1: (Rg.AL, Rg.AH), 2: (Rg.AX, Rg.DX), 4: (Rg.EAX, Rg.EDX), 8: (Rg.RAX, Rg.RDX)}[size]


def _mul1(g: Gen) -> None:
    """One-operand mul/imul: rDX:rAX = rAX * src."""
    size = g.size(0)
    lo_r, hi_r = _acc(size)
    fn = "MUL" if g.ins.mnemonic == M.MUL else "IMUL"
    g.emit(f"y = {g.read(0)}")
    g.emit(f"lo, hi, fw = {fn}({size}, {g.rreg(lo_r)}, y)")
    if size == 1:
        g.wreg(Rg.AX, "lo | (hi << 8)")
    else:
        g.wreg(lo_r, "lo")
        g.wreg(hi_r, "hi")
    g.set_flags(F.RAW, size, "fw")


def _imul(g: Gen) -> None:
    if g.ins.op_count == 1:
        return _mul1(g)
    size = g.size(0)
    if g.ins.op_count == 2:
        a, b = g.read(0), g.read(1)
    else:
        a, b = g.read(1), f"{g.imm(2, size):#x}"
    if not g.flags_live:
        # the low half of a product does not depend on signedness
        g.write(0, f"({a} * {b}) & {MASK[size]:#x}")
        g.unknown_flags()
        return
    g.emit(f"lo, hi, fw = IMUL({size}, {a}, {b})")
    g.write(0, "lo")
    g.set_flags(F.RAW, size, "fw")


def _div(g: Gen) -> None:
    size = g.size(0)
    fn = "DIV" if g.ins.mnemonic == M.DIV else "IDIV"
    g.emit(f"y = {g.read(0)}")
    g.fault()
    if size == 1:
        g.emit(f"q, r = {fn}(1, {g.rreg(Rg.AH)}, {g.rreg(Rg.AL)}, y)")
        g.wreg(Rg.AX, "q | (r << 8)")
    else:
        lo_r, hi_r = _acc(size)
        g.emit(f"q, r = {fn}({size}, {g.rreg(hi_r)}, {g.rreg(lo_r)}, y)")
        g.wreg(lo_r, "q")
        g.wreg(hi_r, "r")


_SHIFT_KIND = {M.ROL: 0, M.ROR: 1, M.RCL: 2, M.RCR: 3, M.SHL: 4, M.SAL: 4, M.SHR: 5, M.SAR: 7,
               M.SHLD: 8, M.SHRD: 9}


def shift_count(g: Gen) -> int | None:
    """The masked constant count of a shift/rotate, None when it is in CL."""
    ins = g.ins
    last = ins.op_count - 1
    if ins.op_count == 1 or (ins.mnemonic in (M.SHLD, M.SHRD) and ins.op_count == 2):
        return 1
    if g.is_imm(last):
        return ins.immediate(last) & (0x3F if g.size(0) == 8 else 0x1F)
    return None


def _shift(g: Gen) -> None:
    kind = _SHIFT_KIND[g.ins.mnemonic]
    size = g.size(0)
    x = g.read(0)
    cnt_k = shift_count(g)
    if kind in (4, 5, 7) and cnt_k:
        # SHL/SHR/SAR by a constant: inline, flags lazy (flags.SHL/SHR/SAR)
        mk, sg = MASK[size], SIGN[size]
        if g.flags_live:
            g.emit(f"x = {x}")
            x = "x"
        if kind == 4:
            t = f"({x} << {cnt_k}) & {mk:#x}"
        elif kind == 5:
            t = f"{x} >> {cnt_k}"
        else:
            t = f"((({x} ^ {sg:#x}) - {sg:#x}) >> {cnt_k}) & {mk:#x}"
        if not g.flags_live:
            g.write(0, t)
            g.unknown_flags()
            return
        g.emit(f"t = {t}")
        g.write(0, "t")
        g.set_flags({4: F.SHL, 5: F.SHR, 7: F.SAR}[kind], size, "t", "x", str(cnt_k))
        return
    if kind in (0, 1) and cnt_k and not g.flags_live:
        # ROL/ROR by a constant whose CF/OF nobody reads (BLAKE2s, ChaCha)
        bits = size * 8
        c = cnt_k % bits if kind == 0 else (bits - cnt_k % bits) % bits
        g.emit(f"x = {x}")
        g.write(0, f"((x << {c}) | (x >> {bits - c})) & {MASK[size]:#x}" if c else "x")
        g.unknown_flags()
        return
    g.emit(f"x = {x}")
    if kind >= 8:
        extra = g.read(1)
        cnt = g.read(2, 1)
    else:
        extra = "0"
        cnt = g.read(1, 1) if g.ins.op_count > 1 else "1"
    g.emit(f"t, fo2, fr2, fa2, fb2 = SHIFT({kind}, {size}, x, {cnt}, fo, fr, fa, fb, {extra})")
    g.write(0, "t")
    g.emit("fo, fr, fa, fb = fo2, fr2, fa2, fb2")
    g.unknown_flags()


def _bt(g: Gen) -> None:
    m = g.ins.mnemonic
    size = g.size(0)
    bits = size * 8
    if g.is_mem(0) and g.is_reg(1):
        g.addr()
        off = g.read(1)
        g.emit(f"o = SX({off}, {size})")
        g.emit(f"a = (a + (o >> {bits.bit_length() - 1}) * {size}) & {0xFFFFFFFFFFFFFFFF if g.bits == 64 else 0xFFFFFFFF:#x}")
        g.emit(f"b = o & {bits - 1}")
        x = g.read(0)
    else:
        x = g.read(0)
        y = g.read(1, 1 if g.is_imm(1) else size)
        g.emit(f"b = {y} & {bits - 1}")
    g.emit(f"x = {x}; cf = (x >> b) & 1")
    if m == M.BTS:
        g.write(0, "x | (1 << b)")
    elif m == M.BTR:
        g.write(0, f"x & ~(1 << b) & {MASK[size]:#x}")
    elif m == M.BTC:
        g.write(0, "x ^ (1 << b)")
    g.set_flags(F.RAW, size, f"({g.flags_expr()} & ~1) | cf")


def _bitscan(g: Gen) -> None:
    m = g.ins.mnemonic
    size = g.size(0)
    g.emit(f"y = {g.read(1)}")
    if m in (M.BSF, M.BSR):
        # a zero source leaves the whole destination (upper half too) alone
        g.emit(f"t, fw = {'BSF' if m == M.BSF else 'BSR'}({size}, y, 0, {g.flags_expr()})")
        g.emit("if y:")
        g.ind += 1
        g.write(0, "t")
        g.ind -= 1
    else:
        g.emit(f"t, fw = {m == M.TZCNT and 'TZCNT' or m == M.LZCNT and 'LZCNT' or 'POPCNT'}({size}, y)")
        g.write(0, "t")
    g.set_flags(F.RAW, size, "fw")


def _xlat(g: Gen) -> None:
    """AL = [seg: rBX + AL] (the address size picks BX, EBX or RBX)."""
    base = g.ins.memory_base
    asz = GPR[base][1]
    ea = f"(({g.rreg(base)} + {g.rreg(Rg.AL)}) & {MASK[asz]:#x})"
    g.bind("SB")
    g.emit(f"a = {g.la(ea, SEG_INDEX[g.ins.memory_segment])}")
    g._have_a = True
    g.emit(f"t = {g.rmem(1)}")
    g.wreg(Rg.AL, "t")


def _bswap(g: Gen) -> None:
    size = g.size(0)
    g.write(0, f"BSWAP({size}, {g.read(0)})")


def _flagop(g: Gen) -> None:
    m = g.ins.mnemonic
    fw = g.flags_expr()
    expr = {M.CLC: f"{fw} & ~1", M.STC: f"{fw} | 1", M.CMC: f"{fw} ^ 1"}[m]
    g.set_flags(F.RAW, 1, expr)


def _lahf(g: Gen) -> None:
    g.wreg(Rg.AH, f"{g.flags_expr()} & 0xD5 | 2")


def _sahf(g: Gen) -> None:
    g.set_flags(F.RAW, 1, f"({g.flags_expr()} & ~0xD5) | ({g.rreg(Rg.AH)} & 0xD5)")


def _dflag(g: Gen) -> None:
    if g.ins.mnemonic == M.STD:
        g.emit("c.rf |= 0x400")
    else:
        g.emit("c.rf &= ~0x400")


def _nop(g: Gen) -> None:
    pass


def _pause(g: Gen) -> None:
    g.helper("PAUSE(c)")   # system.pause: guest time and vCPU yield on spin-waits


EMITTERS = {
    M.ADD: _binop, M.ADC: _binop, M.SUB: _binop, M.SBB: _binop, M.CMP: _binop,
    M.AND: _binop, M.OR: _binop, M.XOR: _binop, M.TEST: _binop,
    M.INC: _incdec, M.DEC: _incdec, M.NEG: _neg, M.NOT: _not,
    M.MOV: _mov, M.MOVZX: _movzx, M.MOVSX: _movsx, M.MOVSXD: _movsx, M.LEA: _lea,
    M.XCHG: _xchg, M.XADD: _xadd, M.CMPXCHG: _cmpxchg,
    M.CBW: _cbw, M.CWDE: _cbw, M.CDQE: _cbw, M.CWD: _cwd, M.CDQ: _cwd, M.CQO: _cwd,
    M.MUL: _mul1, M.IMUL: _imul, M.DIV: _div, M.IDIV: _div,
    M.BT: _bt, M.BTS: _bt, M.BTR: _bt, M.BTC: _bt,
    M.BSF: _bitscan, M.BSR: _bitscan, M.TZCNT: _bitscan, M.LZCNT: _bitscan, M.POPCNT: _bitscan,
    M.BSWAP: _bswap, M.XLATB: _xlat, M.CLC: _flagop, M.STC: _flagop, M.CMC: _flagop,
    M.CLD: _dflag, M.STD: _dflag, M.LAHF: _lahf, M.SAHF: _sahf, M.NOP: _nop, M.PAUSE: _pause, M.LFENCE: _nop,
    M.MFENCE: _nop, M.SFENCE: _nop, M.PREFETCHNTA: _nop, M.PREFETCHT0: _nop,
}
for _m in _SHIFT_KIND:
    EMITTERS[_m] = _shift
for _n in dir(M):
    if _n.startswith("SET") and len(_n) <= 6:
        EMITTERS[getattr(M, _n)] = _setcc
    elif _n.startswith("CMOV") and len(_n) <= 7:
        EMITTERS[getattr(M, _n)] = _cmovcc

# This family's rows of the instruction-facts table (facts.py).
FACTS = {
    **{m: Fact.READS_LAZY for m in (M.SHL, M.SAL, M.SHR, M.SAR, M.ROL, M.ROR, M.RCL, M.RCR,
                                    M.SHLD, M.SHRD, M.BSF, M.BSR, M.BT, M.BTS, M.BTR, M.BTC)},
    M.LEA: Fact.NO_ACCESS, M.NOP: Fact.NO_ACCESS,
    M.DIV: Fact.HELPER, M.IDIV: Fact.HELPER,
}
for _m in (M.ADD, M.SUB, M.ADC, M.SBB, M.AND, M.OR, M.XOR, M.CMP, M.TEST, M.INC, M.DEC, M.NEG,
           M.NOT, M.MOV, M.MOVZX, M.MOVSX, M.MOVSXD, M.SHL, M.SAL, M.SHR, M.SAR, M.IMUL, M.LEA,
           M.NOP):
    FACTS[_m] = FACTS.get(_m, Fact.NONE) | Fact.FWD_KEEP
