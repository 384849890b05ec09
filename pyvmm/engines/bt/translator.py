"""Translation cache: guest basic block -> one compiled Python function.

Blocks are keyed by (linear start, physical start, mode) and registered per
physical page, so a write to a page (guest store or VMM write) drops every
block decoded from it.  A block that jumps back to its own start loops inside
its function; other exits return to the dispatcher."""

from __future__ import annotations

import logging

import iced_x86 as X

from . import flags as F
from .faults import UD, GuestFault
from .gen import Gen, Unsupported
from .mmu import FETCH
from .sem import EMITTERS, ENDS_BLOCK, EXPORTS, HELPER_MNEMONICS

log = logging.getLogger(__name__)

MAX_INSNS = 48
FC = X.FlowControl
_ARITH6 = (X.RflagsBits.OF | X.RflagsBits.SF | X.RflagsBits.ZF | X.RflagsBits.AF
           | X.RflagsBits.CF | X.RflagsBits.PF)
_M = X.Mnemonic
# Emitters that read the lazy flags although the architecture may not
# (a shift by zero leaves the flags alone; bsf/bsr keep them for a zero source).
_READS_LAZY = frozenset({_M.SHL, _M.SAL, _M.SHR, _M.SAR, _M.ROL, _M.ROR, _M.RCL, _M.RCR,
                         _M.SHLD, _M.SHRD, _M.BSF, _M.BSR, _M.BT, _M.BTS, _M.BTR, _M.BTC})
_SYNC_OUT = "#SYNC_OUT"
_SYNC_IN = "#SYNC_IN"


def _namespace() -> dict:
    from . import ops, system
    ns = {"FW": F.flags_word, "CARRY": F.carry, "COND": F.cond, "GuestFault": GuestFault}
    ns.update(ops.EXPORTS)
    ns.update(system.HELPERS)
    ns.update(EXPORTS)
    return ns


class Translator:
    """Decodes, generates and caches blocks for one vCPU."""

    def __init__(self, cpu):
        self.cpu = cpu
        self.cache: dict[tuple, object] = {}
        self.pages: dict[int, set] = {}
        self.ns = _namespace()
        self.translated = 0
        self.invalidated = 0
        self.warned: set[tuple] = set()
        self.single = False

    # -- invalidation --------------------------------------------------------
    def invalidate_page(self, ppn: int) -> None:
        keys = self.pages.pop(ppn, None)
        self.cpu.mmu.unprotect_code(ppn)
        if keys:
            for k in keys:
                if self.cache.pop(k, None) is not None:
                    self.invalidated += 1

    def invalidate_range(self, gpa: int, length: int) -> None:
        for ppn in range(gpa >> 12, (gpa + max(length, 1) - 1 >> 12) + 1):
            if ppn in self.pages:
                self.invalidate_page(ppn)

    def flush(self) -> None:
        for ppn in list(self.pages):
            self.invalidate_page(ppn)

    # -- lookup ----------------------------------------------------------------
    def fetch_la(self) -> int:
        c = self.cpu
        return (c.sb[1] + c.rip) & (0xFFFFFFFFFFFFFFFF if c.mode[0] == 64 else 0xFFFFFFFF)

    def lookup(self, single: bool = False):
        """The block function at the CPU's current CS:RIP (translating it
        if needed). Raises GuestFault for a fetch fault."""
        c = self.cpu
        la = self.fetch_la()
        pa = c.mmu.fetch(la)
        key = (la, pa, c.mode, single)
        fn = self.cache.get(key)
        if fn is None:
            fn = self._translate(la, pa, single)
            self.cache[key] = fn
            ppns = {pa >> 12, (pa + fn.span - 1) >> 12}
            for p in ppns:
                self.pages.setdefault(p, set()).add(key)
                c.mmu.protect_code(p)
        return fn

    # -- translation ---------------------------------------------------------
    def _code_bytes(self, la: int, pa: int) -> bytes:
        mem = self.cpu.memory
        n = 0x1000 - (pa & 0xFFF)
        if not mem.is_ram(pa, n):
            raise GuestFault(UD)  # executing MMIO is not supported
        data = mem.read(pa, n)
        if n < 15:
            try:
                pa2, _ = self.cpu.mmu.translate((la + n) & 0xFFFFFFFFFFFFFFFF, FETCH)
                if mem.is_ram(pa2, 15 - n):
                    data += mem.read(pa2, 15 - n)
            except GuestFault:
                pass
        return data

    def decode(self, la: int, pa: int, single: bool) -> list:
        c = self.cpu
        bits = c.mode[0]
        data = self._code_bytes(la, pa)
        rip = c.rip
        dec = X.Decoder(bits, data, ip=rip)
        out = []
        page_left = 0x1000 - (pa & 0xFFF)
        for ins in dec:
            off = ins.ip - rip
            if off >= page_left and out:
                break
            if ins.code == X.Code.INVALID:
                if out and off + 15 > len(data):
                    break  # may just be cut at the page end
                out.append(ins)
                break
            out.append(ins)
            m = ins.mnemonic
            if single or len(out) >= MAX_INSNS or m in ENDS_BLOCK or ins.flow_control != FC.NEXT:
                break
            if off + ins.len >= page_left:
                break
        return out

    def _liveness(self, insns: list) -> list[bool]:
        """Per instruction: are the flags it writes read later (or visible
        at an exit or a possible fault)?  Flags before an instruction that
        may fault are live: a fault shows them to the guest."""
        live = True
        out = [True] * len(insns)
        for k in range(len(insns) - 1, -1, -1):
            ins = insns[k]
            mod = ins.rflags_modified & _ARITH6
            rd = ins.rflags_read & _ARITH6
            faults = (any(ins.op_kind(i) == X.OpKind.MEMORY for i in range(ins.op_count))
                      or ins.mnemonic in HELPER_MNEMONICS or ins.is_stack_instruction
                      or ins.is_string_instruction or ins.mnemonic not in EMITTERS)
            if faults or ins.flow_control != FC.NEXT or k == len(insns) - 1:
                live = True
            out[k] = live
            if mod == _ARITH6 and not rd:
                live = False
            if rd or (mod and mod != _ARITH6) or ins.mnemonic in _READS_LAZY or faults:
                live = True
        return out

    def _translate(self, la: int, pa: int, single: bool):
        c = self.cpu
        insns = self.decode(la, pa, single)
        g = Gen(c.mode)
        g.start = c.rip
        live = self._liveness(insns)
        rips = [ins.ip for ins in insns]
        n_ok = len(insns)
        for k, ins in enumerate(insns):
            g.ins, g.k, g.flags_live, g.faultable, g.ends = ins, k, live[k], False, False
            g._have_a = False
            g.count = k + 1
            mark = len(g.lines)
            saved_lazy, saved_regs = g.lazy, set(g.regs)
            try:
                if ins.code == X.Code.INVALID:
                    raise Unsupported("invalid encoding")
                em = EMITTERS.get(ins.mnemonic)
                if em is None:
                    raise Unsupported(X.Mnemonic.__dict__.get("_x", "") or f"mnemonic {ins.mnemonic}")
                em(g)
            except Unsupported as e:
                del g.lines[mark:]
                g.lazy, g.regs = saved_lazy, saved_regs
                if k > 0:
                    n_ok = k
                    self.exit(g, f"{ins.ip:#x}", k - 1)
                    break
                self._warn(ins, str(e))
                g.emit(f"n = {k}")
                g.emit(f"raise GuestFault({UD})")
                n_ok = 1
                break
            if g.ends:
                n_ok = k + 1
                break
            if k == len(insns) - 1:
                self.exit(g, f"{ins.next_ip:#x}", k)
        src = self._assemble(g, rips[:n_ok] or [c.rip])
        self.translated += 1
        code = compile(src, f"<bt {c.rip:#x}>", "exec")
        ns = dict(self.ns)
        exec(code, ns)
        fn = ns["blk"]
        last = insns[n_ok - 1] if insns else None
        fn.span = (last.next_ip - c.rip) if last is not None else 1
        fn.src = src
        return fn

    def _warn(self, ins, why: str) -> None:
        key = (ins.ip, self.cpu.mode)
        if key not in self.warned:
            self.warned.add(key)
            log.warning("bt: #UD for unsupported instruction at %#x (%s): %s", ins.ip, why,
                        X.FastFormatter().format(ins) if ins.code != X.Code.INVALID else "invalid")

    @staticmethod
    def exit(g: Gen, rip_expr: str, k: int) -> None:
        """Leaves the block after instruction k with RIP = rip_expr."""
        g.emit(_SYNC_OUT)
        g.emit(f"c.rip = {rip_expr}")
        g.emit(f"c.icount += ic + {k + 1}")
        g.emit("return")

    @staticmethod
    def branch(g: Gen, target: int, k: int) -> None:
        """Jumps to a constant target: loops when it is the block start."""
        if target == g.start:
            g.emit("if not c.pending and ic < 4096:")  # bounded: timers are polled between blocks
            g.emit(f"    ic += {k + 1}")
            g.emit("    continue")
        Translator.exit(g, f"{target:#x}", k)

    def _assemble(self, g: Gen, rips: list[int]) -> str:
        regs = sorted(g.regs)
        binds = sorted(g.binds)
        out = ["def blk(c):", "    R = c.R"]
        if "SB" in binds:
            out.append("    SB = c.sb")
        mm = [b for b in binds if b[:2] in ("rd", "wr")]
        if mm:
            out.append("    m = c.mmu")
            out.append("    " + "; ".join(f"{b} = m.{b}" for b in mm))
        for n in regs:
            out.append(f"    r{n} = R[{n}]")
        out += ["    fo, fr, fa, fb = c.lf", "    n = 0", "    ic = 0", "    try:", "        while True:"]
        for line in g.lines:
            s = line.strip()
            ind = line[:len(line) - len(line.lstrip())]
            if s == _SYNC_OUT:
                for n in regs:
                    out.append(f"{ind}R[{n}] = r{n}")
                out.append(f"{ind}c.lf = (fo, fr, fa, fb)")
            elif s == _SYNC_IN:
                for n in regs:
                    out.append(f"{ind}r{n} = R[{n}]")
                out.append(f"{ind}fo, fr, fa, fb = c.lf")
            else:
                out.append(line)
        out.append("    except BaseException:")
        out.append("        if n >= 0:")
        for n in regs:
            out.append(f"            R[{n}] = r{n}")
        out.append("            c.lf = (fo, fr, fa, fb)")
        out.append(f"            c.rip = {tuple(rips)!r}[n]")
        out.append("            c.icount += ic + n")
        out.append("        else:")
        out.append(f"            c.rip = {tuple(rips)!r}[~n]")
        out.append("            c.icount += ic + ~n")
        out.append("        raise")
        return "\n".join(out) + "\n"
