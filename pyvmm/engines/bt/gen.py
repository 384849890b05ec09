"""Code generation context: turns operands of one decoded instruction into
Python expressions over the block's locals (r0..r15, fo/fr/fa/fb, a, t...).

Semantic modules (alu.py, ctrl.py, string.py, system.py) call these helpers;
they never see iced types other than the Instruction itself."""

from __future__ import annotations

import re

import iced_x86 as X

from . import flags as F

OK = X.OpKind
R = X.Register
MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
SIGN = {1: 0x80, 2: 0x8000, 4: 0x80000000, 8: 0x8000000000000000}
SEG_INDEX = {R.ES: 0, R.CS: 1, R.SS: 2, R.DS: 3, R.FS: 4, R.GS: 5}

# iced register -> (gpr number, size, high byte)
GPR: dict[int, tuple[int, int, bool]] = {}
for _name in dir(R):
    if not _name.isupper():
        continue
    _r = getattr(R, _name)
    _info = X.RegisterInfo(_r)
    if X.RegisterExt.is_gpr(_r):
        _full = _info.full_register
        GPR[_r] = (_full - R.RAX, _info.size, _r in (R.AH, R.CH, R.DH, R.BH))

_IMM = {OK.IMMEDIATE8, OK.IMMEDIATE16, OK.IMMEDIATE32, OK.IMMEDIATE64, OK.IMMEDIATE8TO16,
        OK.IMMEDIATE8TO32, OK.IMMEDIATE8TO64, OK.IMMEDIATE32TO64, OK.IMMEDIATE8_2ND}


_FLAG_NAME = re.compile(r"\bf[orab]\b")
_UNPACK = {2: ("U16", 0xFFE), 4: ("U32", 0xFFC), 8: ("U64", 0xFF8)}
_PACK = {2: ("P16", 0xFFE), 4: ("P32", 0xFFC), 8: ("P64", 0xFF8)}
_INFO = X.InstructionInfoFactory()
# Operand accesses that write: a read-modify-write reads with write intent
# (cmpxchg writes even when the compare fails).
_WRITES = frozenset({X.OpAccess.READ_WRITE, X.OpAccess.READ_COND_WRITE})


class Unsupported(Exception):
    """The translator has no semantics for this instruction (becomes #UD)."""


class Gen:
    """Emits the Python lines of one block."""

    def __init__(self, mode: tuple[int, int, int]):
        self.bits, self.sbits, self.cpl = mode
        self.lines: list[str] = []
        self.ind = 3
        self.regs: set[int] = set()
        self.binds: set[str] = set()
        self.lazy: tuple[int, int, bool] | None = None  # static (kind, size, pure sub)
        self.ins: X.Instruction = None  # type: ignore
        self.k = 0
        self.flags_live = True
        self.faultable = False
        self.ends = False       # instruction ended the block itself
        self.start = 0
        self.count = 0
        self.next_ip: int | None = None   # the trace's next instruction (None: block end)
        self.ea_size = 8        # address size of the last ea() (its value's bound)
        self.fwd: list[str] = []    # values of this trace's pushes a pop may forward (ctrl.push)
        self.skip_to: int | None = None   # a jcc's taken target as an index further on in the trace
        self.tail = None        # emits a copy of a jcc's taken path (Translator.generate), or None

    # -- output -------------------------------------------------------------
    def emit(self, line: str) -> None:
        self.lines.append("    " * self.ind + line)

    def bind(self, name: str) -> str:
        self.binds.add(name)
        return name

    def fault(self) -> None:
        """Marks the instruction as able to fault (records its index)."""
        if not self.faultable:
            self.emit(f"n = {self.k}")
            self.faultable = True

    # -- leaving the block -----------------------------------------------------
    def exit(self, rip_expr: str, k: int) -> None:
        """Leaves the block after instruction k with RIP = rip_expr, through
        the one epilogue after the block's loop (Translator._assemble): a
        block with many side exits writes its registers back in one place,
        which keeps its source, and so its compile time, small."""
        self.emit(f"_xr = {rip_expr}; _xk = {k + 1}")
        self.emit("break")

    def branch(self, target: int, k: int) -> None:
        """Jumps to a constant target: loops when it is the block start."""
        if target == self.start:
            self.emit("if not c.pending and ic < 4096:")  # bounded: timers are polled between blocks
            self.emit(f"    ic += {k + 1}")
            self.emit("    continue")
        self.exit(f"{target:#x}", k)

    # -- operands ------------------------------------------------------------
    def kind(self, i: int) -> int:
        return self.ins.op_kind(i)

    def is_mem(self, i: int) -> bool:
        return self.ins.op_kind(i) == OK.MEMORY

    def is_reg(self, i: int) -> bool:
        return self.ins.op_kind(i) == OK.REGISTER

    def is_imm(self, i: int) -> bool:
        return self.ins.op_kind(i) in _IMM

    def size(self, i: int) -> int:
        ins = self.ins
        k = ins.op_kind(i)
        if k == OK.REGISTER:
            return X.RegisterInfo(ins.op_register(i)).size
        if k == OK.MEMORY:
            return X.MemorySizeInfo(ins.memory_size).size
        if k in (OK.IMMEDIATE8, OK.IMMEDIATE8_2ND):
            return 1
        if k == OK.IMMEDIATE16:
            return 2
        return self.size(0) if i else 4

    def reg(self, n: int) -> str:
        self.regs.add(n)
        return f"r{n}"

    def rreg(self, reg: int) -> str:
        """Expression reading an iced GPR."""
        if reg not in GPR:
            raise Unsupported(f"register {reg}")
        n, size, high = GPR[reg]
        r = self.reg(n)
        if high:
            return f"(({r} >> 8) & 0xFF)"
        return r if size == 8 else f"({r} & {MASK[size]:#x})"

    def wreg(self, reg: int, v: str) -> None:
        """Writes value expression v (already masked to the register's size)."""
        if reg not in GPR:
            raise Unsupported(f"register {reg}")
        n, size, high = GPR[reg]
        r = self.reg(n)
        if high:
            self.emit(f"{r} = ({r} & 0xFFFFFFFFFFFF00FF) | (({v}) << 8)")
        elif size >= 4:
            self.emit(f"{r} = {v}")
        else:
            keep = 0xFFFFFFFFFFFFFFFF ^ MASK[size]
            self.emit(f"{r} = ({r} & {keep:#x}) | ({v})")

    def ea(self) -> str:
        """Expression for the effective address (offset) of the memory operand."""
        ins = self.ins
        asz = 8 if self.bits == 64 else 4
        self.ea_size = asz   # the returned value is always below 1 << (8 * ea_size)
        if ins.memory_base == R.RIP or ins.memory_base == R.EIP:
            return f"{ins.memory_displacement & MASK[asz]:#x}"
        parts = []
        base, index = ins.memory_base, ins.memory_index
        if base != R.NONE:
            asz = GPR[base][1]
            parts.append(self.rreg(base))
        if index != R.NONE:
            asz = GPR[index][1]
            sc = ins.memory_index_scale
            parts.append(self.rreg(index) + (f" * {sc}" if sc > 1 else ""))
        if base == R.NONE and index == R.NONE:
            asz = {16: 2, 32: 4, 64: 8}[self.bits] if ins.memory_displ_size == 0 else min(max(ins.memory_displ_size, 2), 8)
            if self.bits == 64:
                asz = 8 if ins.memory_displ_size >= 4 else asz
        self.ea_size = asz
        disp = ins.memory_displacement & MASK[asz]
        if disp:
            parts.append(f"{disp:#x}")
        if not parts:
            return "0"
        expr = " + ".join(parts)
        if len(parts) == 1 and (base == R.NONE or GPR[base][1] == asz) and index == R.NONE:
            return expr
        return f"(({expr}) & {MASK[asz]:#x})"

    def la(self, ea: str, seg: int) -> str:
        """Linear address of an offset in segment `seg` (0..5)."""
        if self.bits == 64:
            if seg in (4, 5):
                return f"((SB[{seg}] + {ea}) & 0xFFFFFFFFFFFFFFFF)"
            return ea
        return f"((SB[{seg}] + {ea}) & 0xFFFFFFFF)"

    def addr(self) -> str:
        """Emits `a = <linear address of the memory operand>` once; returns 'a'."""
        if not getattr(self, "_have_a", False):
            self.bind("SB")
            seg = SEG_INDEX[self.ins.memory_segment]
            self.emit(f"a = {self.la(self.ea(), seg)}")
            self._have_a = True
        return "a"

    def rmem(self, size: int, la: str = "a") -> str:
        """Expression loading `size` bytes at linear address `la`: a soft-TLB
        hit (one dict lookup) reads the RAM mapping in place, anything else
        calls the MMU's slow path (which may raise GuestFault)."""
        return self._load(size, la, "rd", "TR")

    def rmem_for_write(self, size: int, la: str = "a") -> str:
        """rmem for the read of a read-modify-write: the fast path needs a
        writable mapping (TW), the slow path checks for writing first, so a
        fault reports a write as the CPU does."""
        return self._load(size, la, "rw", "TW")

    def _load(self, size: int, la: str, slow_name: str, tlb: str) -> str:
        self.fault()
        slow = f"{self.bind(f'{slow_name}{size}')}({la})"
        if not la.isidentifier():
            return slow
        self.bind(tlb)
        if size == 1:
            return f"(_e[0][_e[1] + ({la} & 0xFFF)] if (_e := {tlb}.get({la} >> 12)) else {slow})"
        fn, lim = _UNPACK[size]
        return (f"({fn}(_e[0], _e[1] + ({la} & 0xFFF))[0] if (_e := {tlb}.get({la} >> 12)) "
                f"and {la} & 0xFFF <= {lim:#x} else {slow})")

    def written(self, i: int) -> bool:
        """Whether the instruction also writes operand i (its reads then have write intent)."""
        return _INFO.info(self.ins).op_access(i) in _WRITES

    def load(self, target: str, size: int, la: str = "a") -> None:
        """Emits `target = <size bytes at la>` (see rmem)."""
        self.emit(f"{target} = {self.rmem(size, la)}")

    def wmem(self, size: int, v: str, la: str = "a") -> None:
        """Emits a store; the fast path mirrors rmem (pages holding code or
        page tables are never in TW, so their stores take the slow path)."""
        self.fault()
        slow = f"{self.bind(f'wr{size}')}({la}, {v})"
        if not la.isidentifier():
            self.emit(slow)
            return
        self.bind("TW")
        if size == 1:
            self.emit(f"if (_e := TW.get({la} >> 12)): _e[0][_e[1] + ({la} & 0xFFF)] = {v}")
            self.emit(f"else: {slow}")
            return
        fn, lim = _PACK[size]
        self.emit(f"{fn}(_e[0], _e[1] + ({la} & 0xFFF), {v}) if (_e := TW.get({la} >> 12)) "
                  f"and {la} & 0xFFF <= {lim:#x} else {slow}")

    def imm(self, i: int, size: int | None = None) -> int:
        size = size or self.size(i)
        return self.ins.immediate(i) & MASK[size]

    def read(self, i: int, size: int | None = None) -> str:
        """Expression for operand i (memory is loaded into a temp first)."""
        k = self.kind(i)
        size = size or self.size(i)
        if k == OK.REGISTER:
            return self.rreg(self.ins.op_register(i))
        if k == OK.MEMORY:
            self.addr()
            t = f"m{i}"
            if size in (1, 2, 4, 8) and self.written(i):
                self.emit(f"{t} = {self.rmem_for_write(size)}")
            else:
                self.load(t, size)
            return t
        if k in _IMM:
            return f"{self.imm(i, size):#x}"
        raise Unsupported(f"operand kind {k}")

    def write(self, i: int, v: str, size: int | None = None) -> None:
        k = self.kind(i)
        size = size or self.size(i)
        if k == OK.REGISTER:
            self.wreg(self.ins.op_register(i), v)
        elif k == OK.MEMORY:
            self.addr()
            self.wmem(size, v)
        else:
            raise Unsupported(f"write to operand kind {k}")

    # -- flags ---------------------------------------------------------------
    def set_flags(self, kind: int, size: int, fr: str, fa: str = "0", fb: str = "0", pure: bool = False) -> None:
        """Records a lazy flag state (skipped when the flags are dead)."""
        self.lazy = (kind, size, pure)
        if self.flags_live:
            if _FLAG_NAME.search(f"{fr} {fa} {fb}"):
                self.emit(f"fo, fr, fa, fb = {F.op(kind, size)}, {fr}, {fa}, {fb}")
            else:   # four plain stores are cheaper than a tuple build and unpack
                self.emit(f"fo = {F.op(kind, size)}; fr = {fr}; fa = {fa}; fb = {fb}")

    def unknown_flags(self) -> None:
        """Flags were changed by a helper: the static producer is unknown."""
        self.lazy = None

    def flags_expr(self) -> str:
        return "FW(fo, fr, fa, fb)"

    def carry_expr(self) -> str:
        lz = self.lazy
        if lz is not None:
            kind, size, _ = lz
            if kind == F.ADD:
                return f"((fr >> {size * 8}) & 1)"
            if kind == F.SUB:
                return "(1 if fr < 0 else 0)"
            if kind == F.LOGIC:
                return "0"
        return "CARRY(fo, fr, fa, fb)"

    def cond(self, cc: int) -> str:
        """Expression true when condition code cc holds."""
        lz = self.lazy
        neg = cc & 1
        base = cc & ~1
        e = None
        if lz is not None:
            kind, size, pure = lz
            m, s = MASK[size], SIGN[size]
            if base == 4 and kind != F.RAW:
                e = f"not (fr & {m:#x})"
            elif base == 8 and kind != F.RAW:
                e = f"(fr & {s:#x})"
            elif kind == F.SUB and base == 2:
                e = "fr < 0"
            elif kind == F.SUB and base == 6:
                e = f"(fr < 0 or not (fr & {m:#x}))"
            elif kind == F.SUB and pure and base == 12:
                e = f"(fa ^ {s:#x}) < (fb ^ {s:#x})"
            elif kind == F.SUB and pure and base == 14:
                e = f"(fa ^ {s:#x}) <= (fb ^ {s:#x})"
            elif kind == F.LOGIC and base in (0, 2):
                e = "False"
            elif kind == F.LOGIC and base == 12:
                e = f"(fr & {s:#x})"
            elif kind == F.LOGIC and base == 14:
                e = f"((fr & {s:#x}) or not (fr & {m:#x}))"
        if e is None:
            return f"COND({cc}, fo, fr, fa, fb)"
        if neg and e.startswith("not ("):
            return e[4:]    # `not not (x)` would be two more opcodes for a branch test
        return f"(not {e})" if neg else f"({e})"

    # -- state sync around helpers ---------------------------------------------
    def sync_out(self) -> None:
        """Writes locals back to the CPU before a helper that reads it."""
        self.fwd = []    # the helper may store to the stack
        self.emit("#SYNC_OUT")

    def sync_in(self) -> None:
        self.emit("#SYNC_IN")
        self.unknown_flags()

    def helper(self, call: str, sets_flags: bool = True) -> None:
        """Calls a helper with full state in the CPU object. The helper sees
        c.rip = this instruction and may raise GuestFault."""
        self.emit(f"n = {~self.k}")
        self.faultable = True
        self.sync_out()
        self.emit(f"c.rip = {self.ins.ip:#x}")
        self.emit(call)
        self.sync_in()
