"""Translation cache: guest basic block -> one compiled Python function.

Blocks are keyed by (linear start, physical start, mode) and registered per
physical page, so a write to a page (guest store or VMM write) drops every
block decoded from it.  A block that jumps back to its own start loops inside
its function; other exits return to the dispatcher.  With hot_after > 0 a
block first runs on the cold path (cold.py) and is compiled once hot."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass

import iced_x86 as X

from . import cold
from .blockstore import block_key
from . import flags as F
from .faults import UD, GuestFault
from .gen import GPR, Gen, Unsupported
from .mmu import FETCH, P16, P32, P64, U16, U32, U64
from .sem import (CPL0_GOES_ON, EMITTERS, ENDS_BLOCK, EXPORTS, FWD_KEEP, HELPER_MNEMONICS, NO_ACCESS,
                  READS_LAZY)

log = logging.getLogger(__name__)

MAX_INSNS = 48
# A jcc's taken path that returns to the block start within this many
# instructions is copied into the block (Translator._loop_tail), at most
# MAX_TAILS times per block: each copy is source to compile on a first boot.
MAX_TAIL = 12
MAX_TAILS = 2
# A block runs this many times on the cold path (cold.py: per-instruction
# functions from shared templates, nothing compiled) before it is compiled
# whole; 0 compiles every block at once.  Measured on the fitted kernel's
# boot (33k blocks, 36M instructions, deterministic): a cold translation
# costs ~250 us of CPU against ~390 us for a compiled one, but 2/3 of the
# blocks run more than once and pay both, so every threshold tried (1, 2,
# 6, never) lost to 0.  The cold path stays for experiments and is held to
# the same differential tests (tests/bt: harness.COLD).
HOT_AFTER = 0
# Blocks one vCPU keeps compiled; past this the whole cache is dropped (as
# QEMU's TCG does when its code buffer fills) and what is still hot comes
# back, from the block store when there is one.  A compiled block costs
# ~6 KiB of host memory (mostly its code object, 3.11's inline caches
# included) and a boot translates ~35k, most run only during boot: without
# a bound that was ~250 MiB of the VMM's resident set.
MAX_BLOCKS = 12288
# Keep each compiled block's Python source on it (fn.src): for tests and
# debugging only, as it is ~2 KiB a block.
KEEP_SOURCE = os.environ.get("PYVMM_BT_KEEP_SOURCE") == "1"
FC = X.FlowControl
_ARITH6 = (X.RflagsBits.OF | X.RflagsBits.SF | X.RflagsBits.ZF | X.RflagsBits.AF
           | X.RflagsBits.CF | X.RflagsBits.PF)
_M = X.Mnemonic
_SP = frozenset({X.Register.RSP, X.Register.ESP, X.Register.SP, X.Register.SPL})
_NEAR = (X.OpKind.NEAR_BRANCH16, X.OpKind.NEAR_BRANCH32, X.OpKind.NEAR_BRANCH64)
_SYNC_OUT = "#SYNC_OUT"
# Block locals r<n> (one, or a tuple of them) that start a statement of
# generated code: every register assignment does, and counting a statement
# that only reads one costs a write-back more, nothing else.  A cheap
# pattern: it runs over every block's source.
_ASSIGNED = re.compile(r"[\n;:] *(r\d+(?:, r\d+)*)[ ,=]")
_REG_NUM = re.compile(r"\d+")
_SYNC_IN = "#SYNC_IN"


def _sets_all(ins) -> bool:
    """A shift by a non-zero constant writes every arithmetic flag."""
    if ins.mnemonic not in (_M.SHL, _M.SAL, _M.SHR, _M.SAR):
        return False
    last = ins.op_count - 1
    if ins.op_count == 1:
        return True
    if ins.op_kind(last) in (X.OpKind.IMMEDIATE8, X.OpKind.IMMEDIATE8_2ND):
        return ins.immediate(last) & (0x3F if ins.op_code().operand_size == 64 else 0x1F) != 0
    return False


@dataclass
class _Skip:
    """A jcc compiled as `if not taken: <the instructions it jumps over>`."""
    to: int             # trace index of the branch target (the join)
    k: int              # trace index of the jcc
    target: int         # its ip
    ind: int            # indentation of the `if`
    mark: int           # len(g.lines) after the `if`
    lazy: tuple | None  # the static flag producer at the jcc


def _unwind(c, n: int, ic: int, vals: tuple, nums: tuple, lf: tuple, rips: tuple) -> None:
    """A block's exception exit: instruction n (or ~n, for a helper that
    wrote the CPU state itself) raised; writes the block's locals back and
    points rip at that instruction."""
    if n >= 0:
        R = c.R
        for i, v in zip(nums, vals):
            R[i] = v
        c.lf = lf
        c.rip = rips[n]
        c.icount += ic + n
    else:
        c.rip = rips[~n]
        c.icount += ic + ~n


def _namespace() -> dict:
    from . import ops, system
    ns = {"FW": F.flags_word, "CARRY": F.carry, "COND": F.cond, "GuestFault": GuestFault, "UNWIND": _unwind,
          "U16": U16, "U32": U32, "U64": U64, "P16": P16, "P32": P32, "P64": P64}
    ns.update(ops.EXPORTS)
    ns.update(system.HELPERS)
    ns.update(EXPORTS)
    return ns


class Translator:
    """Decodes, generates and caches blocks for one vCPU."""

    def __init__(self, cpu, hot_after: int | None = None):
        self.cpu = cpu
        self.hot_after = HOT_AFTER if hot_after is None else hot_after
        self.cache: dict[tuple, object] = {}
        self.steps: dict[tuple, object] = {}   # (la, pa, mode) -> one instruction's function
        self.pages: dict[int, set] = {}
        self.ns = _namespace()
        mmu = getattr(cpu, "mmu", None)
        if mmu is not None:     # the slow memory paths: globals of every block, not bound per run
            for n in (1, 2, 4, 8):
                self.ns[f"rd{n}"], self.ns[f"wr{n}"] = getattr(mmu, f"rd{n}"), getattr(mmu, f"wr{n}")
                self.ns[f"rw{n}"] = getattr(mmu, f"rw{n}")
        self.translated = 0          # blocks translated (cold or compiled)
        self.compiled = 0            # of which compiled whole (at once or when hot)
        self.invalidated = 0
        self.translate_ns = 0        # host time spent translating (costs.py)
        self.warned: set[tuple] = set()
        self.single = False
        self.store = None            # blockstore.BlockStore shared by the vCPUs, or None
        self.loaded = 0              # blocks loaded from the store instead of compiled
        self.max_blocks = MAX_BLOCKS
        self.evictions = 0           # whole-cache drops for space
        self.keep_source = KEEP_SOURCE
        self._last_code = None       # the module code _compile made last (for the block store)
        self._spans: list[tuple[int, int]] | None = None   # code-page bytes of the block being made

    # -- invalidation --------------------------------------------------------
    def invalidate_page(self, ppn: int) -> None:
        keys = self.pages.pop(ppn, None)
        self.cpu.mmu.unprotect_code(ppn)
        if keys:
            for k in keys:
                if self.cache.pop(k, None) is not None:
                    self.invalidated += 1
                else:
                    self.steps.pop(k, None)

    def invalidate_range(self, gpa: int, length: int) -> None:
        """A write from outside the vCPU (a device's DMA, the VMM) to
        guest-physical [gpa, gpa + length): pages whose translated bytes
        it touched lose their blocks."""
        end = gpa + max(length, 1)
        writes_code = self.cpu.mmu.guard.writes_code
        for ppn in range(gpa >> 12, (end - 1 >> 12) + 1):
            if ppn in self.pages:
                lo = max(gpa, ppn << 12)
                if writes_code(ppn, lo & 0xFFF, min(end, (ppn + 1) << 12) - lo):
                    self.invalidate_page(ppn)

    def flush(self) -> None:
        for ppn in list(self.pages):
            self.invalidate_page(ppn)

    def _make_room(self) -> None:
        """Drops every block and single-instruction function, and the lookup
        caches that point at them (the cache reached max_blocks)."""
        self.flush()
        self.steps.clear()
        jmp = getattr(self.cpu, "jmp", None)
        if jmp is not None:
            jmp.clear()
        self.evictions += 1

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
            t0 = time.perf_counter_ns()
            self._spans = None          # decode() sets them; a block from the store covers its page
            if single and self.hot_after > 0:
                fn = self._translate_single(la, pa)
            elif self.hot_after > 0:
                fn = self._translate_cold(la, pa, key)
            else:
                fn = self._translate(la, pa, single)
            self.translate_ns += time.perf_counter_ns() - t0
            if len(self.cache) >= self.max_blocks:
                self._make_room()
            self.cache[key] = fn
            self._register(key, pa, fn.next_frame, self._spans)
        return fn

    def _register(self, key: tuple, pa: int, next_frame: int | None,
                  spans: list[tuple[int, int]] | None = None) -> None:
        """Files `key` under its code page(s) and guards them: on pa's page
        the bytes of `spans` (None: the whole page), on the next page (an
        instruction crossing into it) the whole page."""
        mmu = self.cpu.mmu
        self.pages.setdefault(pa >> 12, set()).add(key)
        mmu.protect_code(pa >> 12, spans)
        if next_frame is not None:
            self.pages.setdefault(next_frame, set()).add(key)
            mmu.protect_code(next_frame)

    def _step(self, ins, la: int, pa: int):
        """The single-instruction function of `ins` (cached per address)."""
        c = self.cpu
        key = (la, pa, c.mode)
        fn = self.steps.get(key)
        if fn is None:
            off = ins.ip + self._base
            fn = self.steps[key] = cold.step_function(
                self._data[off:off + ins.len], c.mode, ins.ip,
                lambda: self.generate([ins], ins.ip)[0], self.ns)
            off = pa & 0xFFF
            self._register(key, pa, self._next_frame if off + ins.len > 0x1000 else None,
                           [(off, min(ins.len, 0x1000 - off))])
        return fn

    def _translate_single(self, la: int, pa: int):
        insns = self.decode(la, pa, True)
        self.translated += 1
        fn = self._step(insns[0], la, pa)
        fn.next_frame = self._next_frame if self._crosses else None
        return fn

    def _translate_cold(self, la: int, pa: int, key: tuple):
        """A block on the cold path (cold.py); compiled after hot_after runs."""
        c = self.cpu
        insns = self.decode(la, pa, False)
        next_frame = self._next_frame if self._crosses else None
        self.translated += 1
        rip = c.rip
        steps = []
        last = len(insns) - 1
        for k, ins in enumerate(insns):
            d = ins.ip - rip
            nxt = insns[k + 1].ip if k < last and ins.mnemonic not in ENDS_BLOCK else None
            steps.append((self._step(ins, la + d, pa + d), nxt))
            if nxt is None:
                break
        start = rip

        def promote(run):
            t0 = time.perf_counter_ns()
            src, _ = self.generate(insns, start)
            fn = self._compile(src, start)
            fn.next_frame = next_frame
            self.translate_ns += time.perf_counter_ns() - t0
            if self.cache.get(key) is run:
                self.cache[key] = fn
            jmp = c.jmp
            if jmp.get(la) is run:
                jmp[la] = fn
            return fn
        run = cold.cold_block(steps, la, self.hot_after, promote)
        run.next_frame = next_frame
        return run

    def _define(self, code):
        """The block function a compiled module defines.  Every block of this
        translator shares one globals dict (the helpers; blocks assign no
        global): a copy per block was ~4 KiB each, 100 MiB for a boot."""
        ns = self.ns
        exec(code, ns)
        return ns.pop("blk")

    def _compile(self, src: str, start: int):
        self.compiled += 1
        code = self._last_code = compile(src, f"<bt {start:#x}>", "exec")
        fn = self._define(code)
        if self.keep_source:
            fn.src = src
        return fn

    # -- translation ---------------------------------------------------------
    def _code_bytes(self, la: int, pa: int, ext: bool = True) -> tuple[bytes, int | None]:
        """The whole code page of la (and, when ext, up to 15 bytes of the
        next one, for an instruction that crosses the end): (bytes, next
        page's frame or None)."""
        mem = self.cpu.memory
        page = pa & ~0xFFF
        if not mem.is_ram(page, 0x1000):
            raise GuestFault(UD)  # executing MMIO is not supported
        data = mem.read(page, 0x1000)
        nxt = self._next_page(la) if ext else None
        return (data + nxt[0], nxt[1]) if nxt is not None else (data, None)

    def _next_page(self, la: int) -> tuple[bytes, int] | None:
        """The first 15 bytes of the page after la's and its frame, or None
        when that page is not mapped for fetch or not RAM.  A fetch fault is
        kept in _next_fault: it is the guest's only if an instruction really
        needs a byte of that page (the CPU fetches no further than that)."""
        self._next_fault = None
        try:
            pa2, _ = self.cpu.mmu.translate(((la | 0xFFF) + 1) & 0xFFFFFFFFFFFFFFFF, FETCH)
        except GuestFault as fault:
            self._next_fault = fault
            return None
        mem = self.cpu.memory
        return (mem.read(pa2, 15), pa2 >> 12) if mem.is_ram(pa2, 15) else None

    def decode(self, la: int, pa: int, single: bool) -> list:
        """See _decode: the code page alone first, the next page's bytes
        only when the trace reaches an instruction that may cross into it
        (reading them walks the page tables)."""
        out = self._decode(la, pa, single, False)
        if self._near_end:
            out = self._decode(la, pa, single, True)
        self._spans = self._spans_of(out)
        return out

    def _spans_of(self, insns: list) -> list[tuple[int, int]]:
        """The code page's (offset, length) ranges that `insns` were decoded
        from: a translation depends on these bytes and no others."""
        base = self._base
        return [(ins.ip + base, min(ins.len, 0x1000 - ins.ip - base)) for ins in insns]

    def _decode(self, la: int, pa: int, single: bool, ext: bool) -> list:
        """The instructions of a block, in execution order.  The trace goes
        on past a jcc (its taken path is a side exit), through direct
        jmp/call to a target on the same page, and through
        a ret whose return address a call of this trace pushed (the
        generated code checks that prediction); it ends at other control
        flow, at a mode-changing instruction or at the page end."""
        c = self.cpu
        bits = c.mode[0]
        data, self._next_frame = self._code_bytes(la, pa, ext)
        self._near_end = False
        rip = c.rip
        base = (la & 0xFFF) - rip      # page offset of an ip: ip + base
        self._data, self._base = data, base
        out: list = []
        rets: list[int] = []
        ip = rip
        self._crosses = False
        while True:
            dec = X.Decoder(bits, data[ip + base:], ip=ip)
            nxt = None
            for ins in dec:
                off = ins.ip + base
                if ins.code == X.Code.INVALID:
                    if not ext and off + 15 > len(data):
                        self._near_end = True   # may just lack the next page's bytes
                        return out
                    if off + 15 > len(data) and dec.last_error == X.DecoderError.NO_MORE_BYTES:
                        # It needs bytes of a page it cannot fetch: the
                        # block ends before it, and as a block's first
                        # instruction it takes that page's fetch fault
                        # (CR2 = the page's first byte), as the CPU does.
                        if out:
                            return out
                        if self._next_fault is not None:
                            raise self._next_fault
                    out.append(ins)
                    return out
                if off + ins.len > 0x1000:
                    self._crosses = True
                out.append(ins)
                m = ins.mnemonic
                if single or len(out) >= MAX_INSNS or off + ins.len >= 0x1000 or (
                        m in ENDS_BLOCK and not (c.mode[2] == 0 and m in CPL0_GOES_ON)):
                    return out
                if ins.flow_control == FC.NEXT or ins.is_jcc_short_or_near:
                    continue    # a jcc leaves through a side exit; the trace goes on falling through
                nxt = self._follow(ins, rets, base, rip)
                break
            if nxt is None:
                return out
            ip = nxt

    @staticmethod
    def _follow(ins, rets: list, base: int, start: int) -> int | None:
        """Where the trace goes on after a control transfer (None: it ends)."""
        m = ins.mnemonic
        on_page = lambda t: 0 <= t + base < 0x1000 - 15  # noqa: E731
        if m in (_M.JMP, _M.CALL) and ins.op_kind(0) in _NEAR:
            t = ins.near_branch_target
            if not on_page(t) or t == start:
                return None
            if m == _M.CALL:
                if not on_page(ins.next_ip):
                    return None
                rets.append(ins.next_ip)
            return t
        if m == _M.RET and rets:
            return rets.pop()
        return None

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
            faults = ((ins.mnemonic not in NO_ACCESS
                       and any(ins.op_kind(i) == X.OpKind.MEMORY for i in range(ins.op_count)))
                      or ins.mnemonic in HELPER_MNEMONICS or ins.is_stack_instruction
                      or ins.is_string_instruction or ins.mnemonic not in EMITTERS
                      or any(ins.op_kind(i) == X.OpKind.REGISTER and ins.op_register(i) not in GPR
                             for i in range(ins.op_count)))
            if faults or ins.flow_control != FC.NEXT or k == len(insns) - 1:
                live = True
            out[k] = live
            if mod == _ARITH6 and not rd:
                live = False
            if rd or (mod and mod != _ARITH6) or faults or (ins.mnemonic in READS_LAZY and not _sets_all(ins)):
                live = True
        return out

    def _translate(self, la: int, pa: int, single: bool):
        c = self.cpu
        store = self.store
        if store is not None:
            page = self._code_bytes(la, pa, False)[0]
            skey = block_key(la, c.mode, single, page)
            fn = self._load(store.get(skey), la)
            if fn is not None:
                return fn
        insns = self.decode(la, pa, single)
        warned = len(self.warned)
        src, n_ok = self.generate(insns, c.rip)
        self.translated += 1
        fn = self._compile(src, c.rip)
        fn.next_frame = self._next_frame if self._crosses else None
        if store is not None and len(self.warned) == warned:   # keep #UD warnings for every run
            ext = self._data[0x1000:] if self._next_frame is not None else None
            store.put(skey, ext, self._crosses, self._last_code)
        return fn

    def _load(self, entry, la: int):
        """The block function from a store entry, or None when the entry is
        missing or the next page no longer holds the bytes it was decoded from."""
        if entry is None:
            return None
        ext, crosses, code = entry
        next_frame = None
        if ext is not None:
            nxt = self._next_page(la)
            if nxt is None or nxt[0] != ext:
                return None
            next_frame = nxt[1]
        fn = self._define(code)
        fn.next_frame = next_frame if crosses else None
        self.translated += 1
        self.loaded += 1
        return fn

    @staticmethod
    def _keeps_fwd(ins) -> bool:
        """May the trace's recorded pushes (Gen.fwd) stay forwardable across
        ins?  Push/pop/call/ret forms manage the list themselves (ctrl.py);
        anything that may store, run a helper or move RSP clears it."""
        ops = range(ins.op_count)
        if any(ins.op_kind(i) == X.OpKind.REGISTER and (ins.op_register(i) in _SP or ins.op_register(i) not in GPR)
               for i in ops):
            return False    # RSP, or a control/segment register (a helper, a CR3 reload)
        m = ins.mnemonic
        if m in (_M.PUSH, _M.POP, _M.CALL, _M.RET):
            return True
        if m not in FWD_KEEP:
            return False
        return m in NO_ACCESS or not any(ins.op_kind(i) == X.OpKind.MEMORY for i in ops)

    def generate(self, insns: list, start: int) -> tuple[str, int]:
        """The Python source of a block running `insns` (a decoded trace
        starting at ip `start`) in the CPU's current mode, and how many of
        them it covers (the rest follow an instruction that ends the block)."""
        c = self.cpu
        g = Gen(c.mode)
        g.start = start
        live = self._liveness(insns)
        rips = [ins.ip for ins in insns]
        n_ok = len(insns)
        skips: list[_Skip] = []     # open forward-branch regions, innermost last
        tails = 0
        for k, ins in enumerate(insns):
            while skips and skips[-1].to == k:
                self._rejoin(g, skips.pop())
            g.skip_to = self._skip_target(insns, rips, k, skips)
            g.tail = None
            if g.skip_to is None and ins.is_jcc_short_or_near and tails < MAX_TAILS:
                tail = self._loop_tail(ins.near_branch_target, start)
                if tail is not None:
                    g.tail = self._tail_emitter(tail, len(rips), k)
                    rips += [t.ip for t in tail]
                    tails += 1
            why = self._emit(g, ins, k, live[k], insns[k + 1].ip if k + 1 < len(insns) else None)
            if why is not None:
                if k > 0:
                    n_ok = k
                    g.exit(f"{ins.ip:#x}", k - 1)
                    break
                self._warn(ins, why)
                g.emit(f"n = {k}")
                g.emit(f"raise GuestFault({UD})")
                n_ok = 1
                break
            if g.skip_to is not None:
                skips.append(_Skip(g.skip_to, k, ins.near_branch_target, g.ind - 1, len(g.lines), g.lazy))
            if g.ends:
                n_ok = k + 1
                break
            if k == len(insns) - 1:
                g.exit(f"{ins.next_ip:#x}", k)
        while skips:                # the trace stopped inside a region: its taken path leaves
            sk = skips.pop()
            self._close_body(g, sk)
            g.exit(f"{sk.target:#x}", sk.k)
            g.ind -= 1
        return self._assemble(g, rips or [start]), n_ok

    def _emit(self, g: Gen, ins, k: int, live: bool, next_ip: int | None) -> str | None:
        """Emits instruction k of the block (next_ip: the trace's next one);
        returns why it cannot be translated (with its lines taken back) or None."""
        g.ins, g.k, g.flags_live, g.faultable, g.ends = ins, k, live, False, False
        g._have_a = False
        g.count = k + 1
        g.next_ip = next_ip
        mark = len(g.lines)
        saved_lazy, saved_regs, saved_fwd = g.lazy, set(g.regs), list(g.fwd)
        if g.fwd and not self._keeps_fwd(ins):
            g.fwd = []
        try:
            if ins.code == X.Code.INVALID:
                raise Unsupported("invalid encoding")
            em = EMITTERS.get(ins.mnemonic)
            if em is None:
                raise Unsupported(X.Mnemonic.__dict__.get("_x", "") or f"mnemonic {ins.mnemonic}")
            em(g)
        except Unsupported as e:
            del g.lines[mark:]
            g.lazy, g.regs, g.fwd = saved_lazy, saved_regs, saved_fwd
            return str(e)
        return None

    def _loop_tail(self, target: int, start: int) -> list | None:
        """The instructions from a jcc's taken target up to a branch back to
        the block start, when that path is short, on the code page and
        straight (its own jccs leave through side exits): copied into the
        block, it keeps a loop whose body takes either arm of the jcc (`if
        (!p[i]) continue;`) in one block.  None otherwise."""
        base = self._base
        off = target + base
        if target == start or not 0 <= off < 0x1000 - 15:
            return None
        out: list = []
        for ins in X.Decoder(self.cpu.mode[0], self._data[off:0x1000], ip=target):
            if ins.code == X.Code.INVALID or len(out) == MAX_TAIL or ins.mnemonic in ENDS_BLOCK:
                return None
            out.append(ins)
            if ins.is_jcc_short_or_near or (ins.mnemonic == _M.JMP and ins.op_kind(0) in _NEAR):
                if ins.near_branch_target == start:
                    if self._spans is not None:
                        self._spans += self._spans_of(out)   # copied into the block: its bytes count
                    return out
                if ins.mnemonic == _M.JMP:
                    return None
            elif ins.flow_control != FC.NEXT:
                return None
        return None

    def _tail_emitter(self, tail: list, s0: int, k: int):
        """The Gen.tail callback of jcc k: emits `tail` (trace indices s0...)
        inside the jcc's taken branch, then restores what the fall-through
        path assumes.  The counts stay exact: ic moves so that tail index
        s0 + i retires as instruction k + 1 + i of the path."""
        live = self._liveness(tail)

        def emit_tail(g: Gen) -> None:
            saved = (g.ins, g.k, g.flags_live, g.faultable, g.ends, g.count, g.next_ip, g.lazy, list(g.fwd))
            g.emit(f"ic += {k + 1 - s0}")
            g.skip_to = g.tail = None
            for i, t in enumerate(tail):
                why = self._emit(g, t, s0 + i, live[i], tail[i + 1].ip if i + 1 < len(tail) else None)
                if why is not None:
                    g.exit(f"{t.ip:#x}", s0 + i - 1)
                    break
                if g.ends:
                    break
            (g.ins, g.k, g.flags_live, g.faultable, g.ends, g.count, g.next_ip, g.lazy, g.fwd) = saved
        return emit_tail

    @staticmethod
    def _skip_target(insns: list, rips: list[int], k: int, skips: list) -> int | None:
        """The trace index where jcc k's taken path rejoins the trace, when
        it is a forward branch over some of the trace's next instructions
        that nests inside the regions already open; else None (a side
        exit)."""
        ins = insns[k]
        if not ins.is_jcc_short_or_near or k + 2 >= len(insns) or rips[k + 1] != ins.next_ip:
            return None
        try:
            j = rips.index(ins.near_branch_target, k + 2, len(insns))
        except ValueError:
            return None
        if skips and j > skips[-1].to:
            return None
        return j

    @staticmethod
    def _close_body(g: Gen, sk: "_Skip") -> None:
        """Ends the not-taken body of a region and opens its taken branch."""
        if len(g.lines) == sk.mark:
            g.emit("pass")          # every instruction in it compiled to nothing
        g.ind = sk.ind
        g.emit("else:")
        g.ind += 1

    def _rejoin(self, g: Gen, sk: "_Skip") -> None:
        """Closes a region where its branch target starts: the taken path
        skipped sk.to - sk.k - 1 instructions, which the block's count of
        retired instructions (exits count statically) takes back."""
        self._close_body(g, sk)
        g.emit(f"ic -= {sk.to - sk.k - 1}")
        g.ind -= 1
        if g.lazy != sk.lazy:
            g.lazy = None           # the two paths left different flag producers
        g.fwd = []                  # pushes of the body did not happen on the taken path

    def _warn(self, ins, why: str) -> None:
        key = (ins.ip, self.cpu.mode)
        if key not in self.warned:
            self.warned.add(key)
            log.warning("bt: #UD for unsupported instruction at %#x (%s): %s", ins.ip, why,
                        X.FastFormatter().format(ins) if ins.code != X.Code.INVALID else "invalid")

    def _assemble(self, g: Gen, rips: list[int]) -> str:
        regs = sorted(g.regs)
        # Exits write back only registers the block assigns somewhere (a
        # loop may come back to an exit after a later write, so "somewhere",
        # not "so far"); a read-only register still equals R[n].
        written = {int(n) for m in _ASSIGNED.findall("\n" + "\n".join(g.lines)) for n in _REG_NUM.findall(m)}
        wback = [n for n in regs if n in written]
        binds = sorted(g.binds)
        out = ["def blk(c):", "    R = c.R"]
        if "SB" in binds:
            out.append("    SB = c.sb")
        tlb = "; ".join(f"{b} = c.mmu.{b.lower()}" for b in ("TR", "TW") if b in binds)
        if tlb:
            out.append("    " + tlb)
        for n in regs:
            out.append(f"    r{n} = R[{n}]")
        out += ["    fo, fr, fa, fb = c.lf", "    n = 0", "    ic = 0", "    try:", "        while True:"]
        for line in g.lines:
            s = line.strip()
            ind = line[:len(line) - len(line.lstrip())]
            if s == _SYNC_OUT:
                for n in wback:
                    out.append(f"{ind}R[{n}] = r{n}")
                out.append(f"{ind}c.lf = (fo, fr, fa, fb)")
            elif s == _SYNC_IN:
                for n in regs:
                    out.append(f"{ind}r{n} = R[{n}]")
                out.append(f"{ind}fo, fr, fa, fb = c.lf")
                if tlb:
                    out.append(ind + tlb)   # a helper may have switched address space
            else:
                out.append(line)
        out += [f"        R[{n}] = r{n}" for n in wback]
        out += ["        c.lf = (fo, fr, fa, fb)", "        c.rip = _xr", "        c.icount += ic + _xk", "        return"]
        # One helper call instead of the inline write-back keeps the source
        # (and so compile time) smaller; it only runs when a fault leaves.
        out.append("    except BaseException:")
        out.append(f"        UNWIND(c, n, ic, ({''.join(f'r{n}, ' for n in regs)}), "
                   f"({''.join(f'{n}, ' for n in regs)}), (fo, fr, fa, fb), {tuple(rips)!r})")
        out.append("        raise")
        return "\n".join(out) + "\n"
