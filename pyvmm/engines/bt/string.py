"""String instructions (movs/stos/lods/cmps/scas/ins/outs) with rep prefixes.

They run as a helper over the CPU object: registers are updated after each
iteration, so a fault in the middle leaves RSI/RDI/RCX where hardware would."""

from __future__ import annotations

import iced_x86 as X

from . import flags as F
from .bulk import rep_fast, rep_io, rep_tick
from .facts import Fact
from .gen import MASK, SEG_INDEX, Gen

M = X.Mnemonic
_KIND = {M.MOVSB: 1, M.MOVSW: 2, M.MOVSD: 4, M.MOVSQ: 8}
TICK_ELEMENTS = 1024      # element by element, a rep looks at the timers this often


def run_string(c, op: str, size: int, rep: int, asz: int, seg: int) -> None:
    """rep: 0 none, 1 rep/repe, 2 repne. Raises GuestFault with state precise."""
    R = c.R
    am = MASK[asz]
    step = -size if c.rf & F.DF else size
    sb = c.sb
    lam = 0xFFFFFFFFFFFFFFFF if c.mode[0] == 64 else 0xFFFFFFFF
    es = 0 if c.mode[0] == 64 else sb[0]
    src = sb[seg] if (c.mode[0] != 64 or seg >= 4) else 0
    keep = 0 if am == 0xFFFFFFFF else ~am   # a 32-bit register write clears bits 63:32
    if rep and step > 0 and op in ("stos", "movs"):
        rep_fast(c, op, size, am, es, src, lam)   # whole in-page runs at once
    elif rep and step > 0 and op in ("ins", "outs"):
        rep_io(c, op, size, am, es, src, lam)     # whole in-page runs, the bus loops
    left = TICK_ELEMENTS
    while True:
        if rep:
            if R[1] & am == 0:
                return
        si, di = R[6] & am, R[7] & am
        if op == "movs":
            c.wr((es + di) & lam, size, c.rd((src + si) & lam, size))
            R[6] = (R[6] & keep) | ((si + step) & am)
            R[7] = (R[7] & keep) | ((di + step) & am)
        elif op == "stos":
            c.wr((es + di) & lam, size, R[0] & MASK[size])
            R[7] = (R[7] & keep) | ((di + step) & am)
        elif op == "lods":
            v = c.rd((src + si) & lam, size)
            R[0] = v if size >= 4 else (R[0] & ~MASK[size]) | v
            R[6] = (R[6] & keep) | ((si + step) & am)
        elif op in ("cmps", "scas"):
            if op == "cmps":
                a = c.rd((src + si) & lam, size)
                b = c.rd((es + di) & lam, size)
            else:
                a = R[0] & MASK[size]
                b = c.rd((es + di) & lam, size)
            c.lf = (F.op(F.SUB, size), a - b, a, b)
            if op == "cmps":
                R[6] = (R[6] & keep) | ((si + step) & am)
            R[7] = (R[7] & keep) | ((di + step) & am)
        elif op == "ins":
            c.wr((es + di) & lam, size, c.port_in(R[2] & 0xFFFF, size))
            R[7] = (R[7] & keep) | ((di + step) & am)
        elif op == "outs":
            c.port_out(R[2] & 0xFFFF, size, c.rd((src + si) & lam, size))
            R[6] = (R[6] & keep) | ((si + step) & am)
        if not rep:
            return
        R[1] = (R[1] & keep) | ((R[1] - 1) & am)
        if op in ("cmps", "scas"):
            zf = (c.lf[1] & MASK[size]) == 0
            if (rep == 1 and not zf) or (rep == 2 and zf):
                return
        left -= 1
        if not left:
            rep_tick(c, TICK_ELEMENTS)
            left = TICK_ELEMENTS
        if c.pending and R[1] & am:
            c.rip_back = True  # resume this instruction after the interruption
            return


def _emit(g: Gen) -> None:
    ins = g.ins
    if not ins.is_string_instruction:
        from .gen import Unsupported
        raise Unsupported("SSE form of movsd/cmpsd")
    m = ins.mnemonic
    table = {M.MOVSB: ("movs", 1), M.MOVSW: ("movs", 2), M.MOVSD: ("movs", 4), M.MOVSQ: ("movs", 8),
             M.STOSB: ("stos", 1), M.STOSW: ("stos", 2), M.STOSD: ("stos", 4), M.STOSQ: ("stos", 8),
             M.LODSB: ("lods", 1), M.LODSW: ("lods", 2), M.LODSD: ("lods", 4), M.LODSQ: ("lods", 8),
             M.CMPSB: ("cmps", 1), M.CMPSW: ("cmps", 2), M.CMPSD: ("cmps", 4), M.CMPSQ: ("cmps", 8),
             M.SCASB: ("scas", 1), M.SCASW: ("scas", 2), M.SCASD: ("scas", 4), M.SCASQ: ("scas", 8),
             M.INSB: ("ins", 1), M.INSW: ("ins", 2), M.INSD: ("ins", 4),
             M.OUTSB: ("outs", 1), M.OUTSW: ("outs", 2), M.OUTSD: ("outs", 4)}
    op, size = table[m]
    if ins.op_count == 0:
        pass
    rep = 2 if ins.has_repne_prefix and op in ("cmps", "scas") else (1 if (ins.has_rep_prefix or ins.has_repne_prefix) else 0)
    kinds = [ins.op_kind(i) for i in range(ins.op_count)]
    asz = 8 if g.bits == 64 else g.bits // 8
    for k in kinds:
        if k in (X.OpKind.MEMORY_SEG_SI, X.OpKind.MEMORY_SEG_DI, X.OpKind.MEMORY_ESDI):
            asz = 2
        elif k in (X.OpKind.MEMORY_SEG_ESI, X.OpKind.MEMORY_SEG_EDI, X.OpKind.MEMORY_ESEDI):
            asz = 4
        elif k in (X.OpKind.MEMORY_SEG_RSI, X.OpKind.MEMORY_SEG_RDI, X.OpKind.MEMORY_ESRDI):
            asz = 8
    seg = SEG_INDEX.get(ins.memory_segment, 3)
    if not rep and g.bits == 64 and asz == 8 and seg < 4 and op in _INLINE:
        _inline(g, op, size)
        return
    if op in ("ins", "outs") and g.cpl > 0:
        g.helper("IOCHECK(c, R[2] & 0xFFFF)")
    fast = rep == 1 and g.bits == 64 and asz == 8 and seg < 4 and op in ("movs", "stos")
    if fast:
        _rep_inline(g, op, size)
        g.ind += 1
    lazy = g.lazy
    g.helper(f"STRING(c, {op!r}, {size}, {rep}, {asz}, {seg})")
    if op in ("movs", "stos", "lods"):
        g.lazy = lazy   # no flags changed: the reloaded state is the one written out
    if fast:
        g.ind -= 1
    if rep:
        from .ctrl import _exit
        g.emit("if c.rip_back:")
        g.emit(f"    c.rip_back = False")
        g.ind += 1
        _exit(g, f"{ins.ip:#x}")
        g.ind -= 1
        g.ends = False


def _rep_inline(g: Gen, op: str, size: int) -> None:
    """The common 64-bit `rep movs`/`rep stos`: DF=0, the whole run inside
    one page of plain RAM on each side (TLB entries present), no overlap
    that element order would show, nothing pending.  One slice copy; the
    registers end as the element loop leaves them.  Opens an `else:` for
    the general helper, which the caller emits one level deeper."""
    rsi, rdi, rcx = g.reg(6), g.reg(7), g.reg(1)
    g.bind("TW")
    g.emit(f"rn = {rcx}; rb = rn * {size}; ro = {rdi} & 0xFFF")
    cond = (f"rn and not c.rf & 0x400 and not c.pending and ro + rb <= 0x1000"
            f" and (_d := TW.get({rdi} >> 12))")
    if op == "movs":
        g.bind("TR")
        g.emit(f"rs = {rsi} & 0xFFF")
        cond += (f" and rs + rb <= 0x1000 and (_s := TR.get({rsi} >> 12))"
                 f" and not (_s[0] is _d[0] and 0 < _d[1] + ro - _s[1] - rs < rb)")
    g.emit(f"if {cond}:")
    g.ind += 1
    if op == "movs":
        g.emit("_d[0][_d[1] + ro:_d[1] + ro + rb] = _s[0][_s[1] + rs:_s[1] + rs + rb]")
        g.emit(f"{rsi} = ({rsi} + rb) & 0xFFFFFFFFFFFFFFFF")
    else:
        g.emit(f"_d[0][_d[1] + ro:_d[1] + ro + rb] = {g.rreg(_ACC[size])}.to_bytes({size}, 'little') * rn")
    g.emit(f"{rdi} = ({rdi} + rb) & 0xFFFFFFFFFFFFFFFF")
    g.emit(f"{rcx} = 0")
    g.ind -= 1
    g.emit("else:")


_INLINE = ("movs", "stos", "lods", "cmps", "scas")
_ACC = {1: X.Register.AL, 2: X.Register.AX, 4: X.Register.EAX, 8: X.Register.RAX}


def _inline(g: Gen, op: str, size: int) -> None:
    """One un-prefixed 64-bit string instruction as straight-line code:
    memory first, then RSI/RDI, so a fault leaves the registers as they were."""
    _df(g)
    rsi, rdi = g.reg(6), g.reg(7)
    acc = _ACC[size]
    if op == "movs":
        g.load("v", size, rsi)
        g.wmem(size, "v", rdi)
    elif op == "stos":
        g.wmem(size, g.rreg(acc), rdi)
    elif op == "lods":
        g.load("v", size, rsi)
        g.wreg(acc, "v")
    else:
        if op == "cmps":
            g.load("x", size, rsi)
        else:
            g.emit(f"x = {g.rreg(acc)}")
        g.load("y", size, rdi)
        g.emit("t = x - y")
        g.set_flags(F.SUB, size, "t", "x", "y", pure=True)
    if op in ("movs", "lods", "cmps"):
        g.emit(f"{rsi} = ({rsi} - {size} if dfl else {rsi} + {size}) & 0xFFFFFFFFFFFFFFFF")
    if op != "lods":
        g.emit(f"{rdi} = ({rdi} - {size} if dfl else {rdi} + {size}) & 0xFFFFFFFFFFFFFFFF")


def _plain(ln: str, pre: str) -> bool:
    """A line that cannot change DF: no CPU object access, no state sync, and
    straight-line at depth `pre`, or part of a try block whose handler only
    runs a slow memory access (`try:` / body / `except KeyError: ...`)."""
    if not ln.startswith(pre) or "c." in ln or "#SYNC" in ln:
        return False
    s = ln.lstrip()
    if s == "try:" or s.startswith("except KeyError: "):
        return not ln[len(pre)].isspace()
    if s.startswith("if ") and s.endswith(": raise KeyError"):
        return True
    return not s.startswith(("if ", "else", "elif", "while", "for ", "try", "except"))


def _df(g: Gen) -> None:
    """Makes the local `dfl` hold c.rf's DF bit: reuses the value an earlier
    string instruction loaded when every line since is straight-line code at
    the same depth that touches neither the CPU object nor the CPU state
    sync (so nothing in between can have changed DF)."""
    mark = getattr(g, "_df_mark", None)
    if mark is not None and mark[1] == g.ind and mark[0] <= len(g.lines):
        since = g.lines[mark[0]:]
        pre = "    " * g.ind
        if all(_plain(ln, pre) for ln in since):
            return
    g.emit("dfl = c.rf & 0x400")
    g._df_mark = (len(g.lines), g.ind)


EMITTERS = {}
for _m in ("MOVS", "STOS", "LODS", "CMPS", "SCAS", "INS", "OUTS"):
    for _s in "BWDQ":
        if hasattr(M, _m + _s):
            EMITTERS[getattr(M, _m + _s)] = _emit

# This family's rows of the instruction-facts table (facts.py): every string
# form runs through a helper.
FACTS = {m: Fact.HELPER for m in EMITTERS}
