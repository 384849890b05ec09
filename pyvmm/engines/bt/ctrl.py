"""Control flow and stack: jmp/jcc/call/ret/loop, push/pop, enter/leave,
int/iret and far transfers (the last through CPU helpers)."""

from __future__ import annotations

import iced_x86 as X

from . import flags as F
from .facts import Fact
from .gen import MASK, SEG_INDEX, Gen, Unsupported

M = X.Mnemonic
Rg = X.Register


def _exit(g: Gen, rip: str) -> None:
    g.exit(rip, g.k)
    g.ends = True


def _goto(g: Gen, target: int) -> None:
    g.branch(target, g.k)
    g.ends = True


def _ipmask(g: Gen) -> int:
    return MASK[{16: 2, 32: 4, 64: 8}[g.bits]] if g.ins.code_size else 0xFFFFFFFF


def _target(g: Gen) -> int:
    ins = g.ins
    t = ins.near_branch_target
    osz = g.size(0) if ins.op_count else 0
    return t


def _spmask(g: Gen) -> int:
    return MASK[g.sbits // 8]


def _canonical_target(g: Gen, t: str, undo: str = "") -> None:
    """In 64-bit mode, a near branch to a non-canonical address raises #GP
    at the branch, with nothing changed (`undo` restores what was)."""
    if g.bits != 64:
        return
    g.fault()
    g.emit(f"if (({t} + 0x800000000000) & 0xFFFFFFFFFFFFFFFF) >> 48:")
    if undo:
        g.emit(f"    {undo}")
    g.emit("    raise GuestFault(13, 0)")


def push(g: Gen, v: str, size: int, fwd: bool = False) -> None:
    """Emits a push of expression v (size bytes).  With fwd, v (a constant
    or a local nothing else assigns) is recorded in g.fwd, so a matching pop
    later in the trace can take it without reading memory back."""
    spm = _spmask(g)
    sp = g.reg(4)
    if spm == MASK[8]:   # masking only on wrap-around: cheaper than `& mask` on every push
        g.emit(f"sp = {sp} - {size}")
        g.emit(f"if sp < 0: sp &= {spm:#x}")
    else:
        g.emit(f"sp = ({sp} - {size}) & {spm:#x}")
    la = "sp" if g.bits == 64 else f"(SB[2] + sp) & 0xFFFFFFFF"
    g.bind("SB")
    g.wmem(size, v, la)
    if spm == MASK[8] or spm == MASK[4]:
        g.emit(f"{sp} = sp")
    else:
        g.emit(f"{sp} = ({sp} & ~{spm:#x}) | sp")
    if fwd and size == 8 and g.bits == 64:
        g.fwd.append(v)
    else:
        g.fwd = []


def pop_expr(g: Gen, size: int, fwd: bool = False) -> str | None:
    """Emits `p = <popped value>` and the stack pointer update.  With fwd,
    a pop of the slot the trace's last recorded push wrote (g.fwd: no store,
    helper or other RSP change since, see Translator.generate) takes that
    push's value instead of reading it back (the store hit RAM, so the read
    would return it and cannot fault); returns that value expression."""
    spm = _spmask(g)
    sp = g.reg(4)
    if fwd and g.fwd and size == 8 and g.bits == 64:
        v = g.fwd.pop()
        g.emit(f"p = {v}")
        g.emit(f"{sp} = {sp} + 8")
        g.emit(f"if {sp} > {spm:#x}: {sp} &= {spm:#x}")
        return v
    g.fwd = []
    g.bind("SB")
    g.emit(f"sp = {sp} & {spm:#x}" if spm != MASK[8] else f"sp = {sp}")
    la = "sp" if g.bits == 64 else f"(SB[2] + sp) & 0xFFFFFFFF"
    g.load("p", size, la)
    g.emit(f"{sp} = ({sp} & ~{spm:#x}) | ((sp + {size}) & {spm:#x})" if spm != MASK[8]
           else f"{sp} = sp + {size}")
    if spm == MASK[8]:
        g.emit(f"if {sp} > {spm:#x}: {sp} &= {spm:#x}")


def _jmp(g: Gen) -> None:
    if g.ins.op_kind(0) in (X.OpKind.NEAR_BRANCH16, X.OpKind.NEAR_BRANCH32, X.OpKind.NEAR_BRANCH64):
        if g.ins.near_branch_target == g.next_ip:
            return  # the trace goes on at the target
        _goto(g, g.ins.near_branch_target)
        return
    if g.ins.op_kind(0) in (X.OpKind.REGISTER, X.OpKind.MEMORY) and not g.ins.is_jmp_far_indirect:
        g.emit(f"t = {g.read(0)}")
        _canonical_target(g, "t")
        _exit(g, "t")
        return
    _far(g)


def _jcc(g: Gen) -> None:
    cc = g.ins.condition_code - 1
    if g.skip_to is not None:
        # the taken path rejoins the trace further on (Translator.generate
        # closes the region): the fall-through instructions up to there
        # run only when the branch is not taken
        g.emit(f"if {g.cond(cc ^ 1)}:")
        g.ind += 1
        return
    g.emit(f"if {g.cond(cc)}:")
    g.ind += 1
    if g.tail is not None:
        g.tail(g)                       # the taken path, copied in: it loops back or leaves
    else:
        g.branch(g.ins.near_branch_target, g.k)
    g.ind -= 1
    if g.next_ip != g.ins.next_ip:      # else the trace goes on along the fall-through path
        _exit(g, f"{g.ins.next_ip:#x}")


def _loop(g: Gen) -> None:
    m = g.ins.mnemonic
    # The count is CX, ECX or RCX by the address size (0x67 included), not the mode.
    if m in (M.JCXZ, M.JECXZ, M.JRCXZ):
        creg = {M.JCXZ: Rg.CX, M.JECXZ: Rg.ECX, M.JRCXZ: Rg.RCX}[m]
    else:
        creg = {16: Rg.CX, 32: Rg.ECX, 64: Rg.RCX}[X.OpCodeInfo(g.ins.code).address_size]
    size = X.RegisterInfo(creg).size
    if m in (M.JCXZ, M.JECXZ, M.JRCXZ):
        cond = f"not {g.rreg(creg)}"
    else:
        g.wreg(creg, f"({g.rreg(creg)} - 1) & {MASK[size]:#x}")
        cond = f"{g.rreg(creg)}"
        if m == M.LOOPE:
            cond += f" and {g.cond(4)}"
        elif m == M.LOOPNE:
            cond += f" and {g.cond(5)}"
    g.emit(f"if {cond}:")
    g.ind += 1
    g.branch(g.ins.near_branch_target, g.k)
    g.ind -= 1
    _exit(g, f"{g.ins.next_ip:#x}")


def _opsize(g: Gen) -> int:
    """Operand size of a stack instruction (push/pop/call/ret)."""
    return X.OpCodeInfo(g.ins.code).operand_size // 8 or (8 if g.bits == 64 else g.bits // 8)


def _call(g: Gen) -> None:
    ins = g.ins
    if ins.is_call_far or ins.is_call_far_indirect:
        _far(g)
        return
    size = _opsize(g)
    if ins.op_kind(0) in (X.OpKind.REGISTER, X.OpKind.MEMORY):
        g.emit(f"t = {g.read(0)}")
        _canonical_target(g, "t")
    else:
        g.emit(f"t = {ins.near_branch_target:#x}")
    push(g, f"{ins.next_ip & MASK[size]:#x}", size, fwd=True)
    if ins.op_kind(0) not in (X.OpKind.REGISTER, X.OpKind.MEMORY) and ins.near_branch_target == g.next_ip:
        return  # inlined: the trace goes on at the target
    _exit(g, "t")


def _ret(g: Gen) -> None:
    if g.ins.mnemonic == M.RETF:
        _far(g)
        return
    size = _opsize(g)
    if g.bits == 64:
        g.emit(f"o4 = {g.reg(4)}")
    known = pop_expr(g, size, fwd=not g.ins.op_count)
    if known is None or not known.startswith("0x"):   # not a return address this trace's call pushed
        _canonical_target(g, "p", undo=f"{g.reg(4)} = o4")
    if g.ins.op_count:
        n = g.ins.immediate(0) & 0xFFFF
        spm = _spmask(g)
        g.emit(f"r4 = (r4 & ~{spm:#x}) | ((r4 + {n}) & {spm:#x})")
        g.fwd = []
    if g.next_ip is not None and known == f"{g.next_ip:#x}":
        return   # the return address is the one this trace's call pushed
    if g.next_ip is not None:
        # the trace predicted the return address a call of its own pushed
        g.emit(f"if p != {g.next_ip:#x}:")
        g.ind += 1
        _exit(g, "p")
        g.ind -= 1
        g.ends = False
        return
    _exit(g, "p")


def _push(g: Gen) -> None:
    size = _opsize(g)
    if g.is_reg(0) and g.ins.op0_register in SEG_INDEX:
        g.bind("c")
        v = f"c.seg[{SEG_INDEX[g.ins.op0_register]}].selector"
    elif g.is_imm(0):
        v = f"{g.ins.immediate(0) & MASK[size]:#x}"
    else:
        v = g.read(0, size)
    fwd = g.is_reg(0) or g.is_imm(0)
    t = f"_q{len(g.fwd)}" if fwd else "v"   # a local per depth: a matching pop reads it
    g.emit(f"{t} = {v}")
    push(g, t, size, fwd=fwd)


def _pop(g: Gen) -> None:
    size = _opsize(g)
    if g.is_reg(0) and g.ins.op0_register in SEG_INDEX:
        idx = SEG_INDEX[g.ins.op0_register]
        g.helper(f"c.load_seg({idx}, c.pop({size}))")
        _exit(g, f"{g.ins.next_ip:#x}")
        return
    if g.is_mem(0):
        # The address uses RSP after the pop; a faulting store leaves RSP as it was.
        sp = g.reg(4)
        g.emit(f"o4 = {sp}")
        pop_expr(g, size)
        g.addr()
        g.emit(f"n4 = {sp}; {sp} = o4")
        g.write(0, "p", size)
        g.emit(f"{sp} = n4")
    else:
        pop_expr(g, size, fwd=True)
        g.write(0, "p", size)


def _leave(g: Gen) -> None:
    size = _opsize(g)
    spm = _spmask(g)
    g.reg(4), g.reg(5)
    # RSP changes only once the pop has read the stack (a fault leaves it).
    g.emit("o4 = r4")
    g.emit(f"r4 = (r4 & ~{spm:#x}) | (r5 & {spm:#x})")
    g.fault()
    g.emit("try:")
    g.ind += 1
    pop_expr(g, size)
    g.ind -= 1
    g.emit("except GuestFault:")
    g.emit("    r4 = o4")
    g.emit("    raise")
    g.wreg({2: Rg.BP, 4: Rg.EBP, 8: Rg.RBP}[size], "p")


def _enter(g: Gen) -> None:
    size = _opsize(g)
    alloc = g.ins.immediate(0) & 0xFFFF
    level = g.ins.immediate(1) & 0x1F
    if level:
        g.helper(f"ENTER(c, {size}, {alloc}, {level})")
        return
    bp = {2: Rg.BP, 4: Rg.EBP, 8: Rg.RBP}[size]
    spm = _spmask(g)
    g.emit(f"o4 = {g.reg(4)}")
    push(g, g.rreg(bp), size)
    # SDM ENTER: #PF also if a write at the final stack pointer would fault
    # (checked after the push, which stays written; RSP does not change).
    g.bind("SB")
    final = f"(({g.reg(4)} - {alloc}) & {spm:#x})"
    g.emit("try:")
    g.emit(f"    {g.bind('rw1')}({final if g.bits == 64 else f'(SB[2] + {final}) & 0xFFFFFFFF'})")
    g.emit("except GuestFault:")
    g.emit(f"    {g.reg(4)} = o4")
    g.emit("    raise")
    g.emit(f"fp = r4 & {spm:#x}")
    g.wreg(bp, f"fp & {MASK[size]:#x}")
    g.emit(f"r4 = (r4 & ~{spm:#x}) | ((fp - {alloc}) & {spm:#x})")


def _pushf(g: Gen) -> None:
    size = _opsize(g)
    if g.cpl == 0:
        g.emit(f"v = ((c.rf & ~0x308D5) | {g.flags_expr()} | 2) & {MASK[size]:#x}")
        push(g, "v", size)
        return
    g.helper(f"PUSHF(c, {size})")


def _popf(g: Gen) -> None:
    size = _opsize(g)
    if g.cpl == 0:
        # CPL0: no IOPL/IF restrictions; the block ends only when IF or TF
        # went up (an interrupt may be due) or the dispatcher is wanted.
        mask = 0x257FD5 if size >= 4 else 0x7FD5
        g.emit("o = c.rf")
        pop_expr(g, size)
        # POPF clears RF (SDM POPF); only IRET loads it from memory
        g.emit(f"c.rf = (((o & ~{mask:#x}) | (p & {mask:#x})) & {0x3F7FD7 & ~F.ARITH & ~F.RF:#x}) | 2")
        g.set_flags(F.RAW, 1, f"p & {F.ARITH:#x}")
        g.emit(f"if c.rf & {F.TF:#x}: c.pending = True")   # single-step from here on (smp.py)
        g.emit(f"if (c.rf & ~o) & {F.IF:#x}: c.irq_window()")  # an interrupt may be due now
        g.emit("if (c.rf & ~o) & 0x300 or c.pending:")
        g.ind += 1
        _exit(g, f"{g.ins.next_ip:#x}")
        g.ind -= 1
        g.ends = False
        return
    g.helper(f"POPF(c, {size})")
    _exit(g, f"{g.ins.next_ip:#x}")


def _int(g: Gen) -> None:
    m = g.ins.mnemonic
    vec = 3 if m == M.INT3 else (4 if m == M.INTO else g.ins.immediate(0) & 0xFF)
    if m == M.INTO:
        g.emit(f"if {g.cond(0)}:")
        g.ind += 1
    g.helper(f"SOFTINT(c, {vec}, {g.ins.next_ip:#x})")
    _exit(g, "c.rip")
    if m == M.INTO:
        g.ind -= 1
        g.ends = False
        _exit(g, f"{g.ins.next_ip:#x}")


def _iret(g: Gen) -> None:
    size = {M.IRET: 2, M.IRETD: 4, M.IRETQ: 8}[g.ins.mnemonic]
    g.helper(f"c.iret({size})")
    _exit(g, "c.rip")


def _far(g: Gen) -> None:
    """Far jmp/call/ret through a helper working on the CPU object."""
    ins = g.ins
    m = ins.mnemonic
    size = X.OpCodeInfo(ins.code).operand_size // 8 or g.bits // 8
    if m == M.RETF:
        n = ins.immediate(0) & 0xFFFF if ins.op_count else 0
        g.helper(f"FAR(c, 'ret', {size}, 0, 0, {n}, {ins.next_ip:#x})")
    elif ins.op_kind(0) in (X.OpKind.FAR_BRANCH16, X.OpKind.FAR_BRANCH32):
        sel, off = ins.far_branch_selector, ins.far_branch32 if ins.op_kind(0) == X.OpKind.FAR_BRANCH32 else ins.far_branch16
        g.helper(f"FAR(c, {'call' if m == M.CALL else 'jmp'!r}, {size}, {sel}, {off}, 0, {ins.next_ip:#x})")
    elif g.is_mem(0):
        g.addr()
        g.emit(f"off = {g.rmem(size)}; sel = {g.rmem(2, f'a + {size}')}")
        g.helper(f"FAR(c, {'call' if m == M.CALL else 'jmp'!r}, {size}, sel, off, 0, {ins.next_ip:#x})")
    else:
        raise Unsupported("far transfer form")
    _exit(g, "c.rip")


EMITTERS = {
    M.JMP: _jmp, M.CALL: _call, M.RET: _ret, M.RETF: _ret,
    M.LOOP: _loop, M.LOOPE: _loop, M.LOOPNE: _loop, M.JCXZ: _loop, M.JECXZ: _loop, M.JRCXZ: _loop,
    M.PUSH: _push, M.POP: _pop, M.LEAVE: _leave, M.ENTER: _enter,
    M.PUSHF: _pushf, M.PUSHFD: _pushf, M.PUSHFQ: _pushf,
    M.POPF: _popf, M.POPFD: _popf, M.POPFQ: _popf,
    M.INT: _int, M.INT3: _int, M.INTO: _int, M.IRET: _iret, M.IRETD: _iret, M.IRETQ: _iret,
}
for _n in ("JO", "JNO", "JB", "JAE", "JE", "JNE", "JBE", "JA", "JS", "JNS", "JP", "JNP", "JL", "JGE", "JLE", "JG"):
    EMITTERS[getattr(M, _n)] = _jcc

# This family's rows of the instruction-facts table (facts.py).
FACTS = {
    **{m: Fact.ENDS_BLOCK | Fact.CPL0_GOES_ON for m in (M.POPF, M.POPFD, M.POPFQ)},
    **{m: Fact.HELPER for m in (M.PUSHF, M.PUSHFD, M.PUSHFQ, M.INT, M.INT3, M.INTO, M.IRET, M.IRETD,
                                 M.IRETQ, M.ENTER)},
    **{m: Fact.FWD_KEEP for m in (M.JMP, M.JE, M.JNE, M.JB, M.JAE, M.JBE, M.JA, M.JL, M.JGE, M.JLE, M.JG,
                                   M.JS, M.JNS)},
}
