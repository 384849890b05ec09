"""DR0-DR3 breakpoints and DR6/DR7 (Intel SDM Vol. 3, 18.2-18.3).

Translated blocks carry no breakpoint checks, so the fast path costs
nothing: while DR7 enables any of the four breakpoints, the scheduler runs
the vCPU one instruction at a time through `step()` instead of in blocks
(a MOV to DR7 ends its block and asks the dispatcher in).  Per instruction:

- execute breakpoints (R/W = 00) are faults, taken before the instruction
  at CS.base + RIP unless RF is set (RF is set by an IRET that loaded it,
  and clears when an instruction completes);
- data breakpoints (R/W = 01 writes, 11 reads or writes; LEN 1, 2, 4 or 8
  bytes, the address aligned down to LEN as the CPU does) and I/O
  breakpoints (R/W = 10, only with CR4.DE) are traps, taken after the
  instruction completed, together with a TF single-step (DR6.BS); after a
  mov ss they wait for the end of the next instruction (SDM Vol. 3, 6.8.3).

DR6.B0-B3 report the breakpoints that matched (the other DR6 bits are
sticky: the CPU never clears them).  General detect (DR7.GD) is in
system.py: a MOV DR raises #DB with DR6.BD and clears GD.

The memory operands come from the decoder (iced's InstructionInfo): the
addresses the instruction's explicit and stack operands use, computed from
the registers before it runs.  A `rep` string instruction is matched on
its first element only (limitation: a breakpoint on a later element is
not reported); descriptor-table and other implicit system accesses are
not matched."""

from __future__ import annotations

import iced_x86 as X

from . import flags as F
from .faults import DB, GuestFault
from .gen import GPR, MASK, SEG_INDEX

DR6_BS = 1 << 14          # single step
DR6_BD = 1 << 13          # general detect
DR7_GD = 1 << 13
ENABLE_BITS = 0xFF        # L0, G0, ... L3, G3
CR4_DE = 1 << 3
_LEN = (1, 2, 8, 4)       # DR7.LENn encodings 00, 01, 10, 11
RW_EXEC, RW_WRITE, RW_IO, RW_RW = 0, 1, 2, 3
_WRITES = frozenset({X.OpAccess.WRITE, X.OpAccess.COND_WRITE, X.OpAccess.READ_WRITE,
                     X.OpAccess.READ_COND_WRITE})
_READS = frozenset({X.OpAccess.READ, X.OpAccess.COND_READ, X.OpAccess.READ_WRITE,
                    X.OpAccess.READ_COND_WRITE})
_IO = {X.Mnemonic.IN, X.Mnemonic.OUT, X.Mnemonic.INSB, X.Mnemonic.INSW, X.Mnemonic.INSD,
       X.Mnemonic.OUTSB, X.Mnemonic.OUTSW, X.Mnemonic.OUTSD}
_INFO = X.InstructionInfoFactory()
_ADDR_MASK = {X.CodeSize.CODE16: 0xFFFF, X.CodeSize.CODE32: 0xFFFFFFFF, X.CodeSize.CODE64: MASK[8]}


def armed(c) -> bool:
    """Whether DR7 enables any breakpoint (the vCPU then runs through step())."""
    return bool(c.dr[7] & ENABLE_BITS)


def _enabled(c):
    """(n, R/W, length, aligned address) of each enabled breakpoint."""
    dr7 = c.dr[7]
    for n in range(4):
        if dr7 >> (2 * n) & 3:
            rw = dr7 >> (16 + 4 * n) & 3
            length = _LEN[dr7 >> (18 + 4 * n) & 3]
            yield n, rw, length, c.dr[n] & ~(length - 1)


def exec_hits(c, la: int) -> int:
    """B0-B3 bits of the execute breakpoints at linear address `la`."""
    return sum(1 << n for n, rw, _ln, addr in _enabled(c) if rw == RW_EXEC and addr == la)


def _overlap(hits_rw, c, start: int, size: int) -> int:
    return sum(1 << n for n, rw, ln, addr in _enabled(c)
               if rw in hits_rw and start < addr + ln and addr < start + size)


def _decode(c, la: int):
    """The instruction at `la`, or None when its bytes cannot be read
    (execute_one then raises the fetch fault itself)."""
    code = b""
    try:
        while len(code) < 15:
            a = (la + len(code)) & c.ipmask
            n = min(15 - len(code), 0x1000 - (a & 0xFFF))
            code += c.mmu.read_slow(a, n).to_bytes(n, "little")
    except GuestFault:
        pass
    if not code:
        return None
    ins = X.Decoder(c.mode[0], code, ip=c.rip).decode()
    return None if ins.code == X.Code.INVALID else ins


def _reg(c, r: int) -> int:
    if r == X.Register.NONE:
        return 0
    num, size, *_ = GPR[r]
    return c.R[num] & MASK[size]


def _seg_base(c, seg: int) -> int:
    i = SEG_INDEX.get(seg, 3)
    if c.mode[0] == 64 and i < 4:
        return 0
    return c.sb[i]


def data_hits(c, ins) -> int:
    """B0-B3 bits of the data and I/O breakpoints `ins` will match when it
    completes, from the registers before it runs."""
    hits = 0
    default = {16: 0xFFFF, 32: 0xFFFFFFFF, 64: MASK[8]}[c.mode[0]]
    for m in _INFO.info(ins).used_memory():
        if m.access not in _WRITES and m.access not in _READS:
            continue                                  # lea, nop, prefetch: no access
        size = X.MemorySizeExt.size(m.memory_size) or 1
        amask = _ADDR_MASK.get(m.address_size, default)
        off = (_reg(c, m.base) + _reg(c, m.index) * m.scale + m.displacement) & amask
        la = (_seg_base(c, m.segment) + off) & (MASK[8] if c.mode[0] == 64 else 0xFFFFFFFF)
        kinds = (RW_WRITE, RW_RW) if m.access in _WRITES else (RW_RW,)
        hits |= _overlap(kinds, c, la, size)
    if ins.mnemonic in _IO and c.cr4 & CR4_DE:
        port = ins.immediate(0 if ins.mnemonic == X.Mnemonic.OUT else 1) \
            if X.OpKind.IMMEDIATE8 in (ins.op0_kind, ins.op1_kind) else c.R[2] & 0xFFFF
        size = {X.Mnemonic.INSB: 1, X.Mnemonic.OUTSB: 1, X.Mnemonic.INSW: 2, X.Mnemonic.OUTSW: 2,
                X.Mnemonic.INSD: 4, X.Mnemonic.OUTSD: 4}.get(ins.mnemonic)
        if size is None:
            reg = ins.op1_register if ins.mnemonic == X.Mnemonic.OUT else ins.op0_register
            size = GPR[reg][1]
        hits |= _overlap((RW_IO,), c, port, size)
    return hits


def _entered_by(c, ins) -> bool:
    """Whether the event just delivered is the INT n, INT3 or INTO that `ins`
    is.  A #DB a mov/pop ss held survives only those: after them it comes at
    the handler's first instruction, while a fault (or INT1) of the
    instruction after the mov/pop ss drops it (SDM Vol. 3, 6.8.3, as the
    CVE-2018-8897 fixes measured it; SYSCALL and SYSENTER deliver no event,
    so the held #DB simply follows them, at the kernel's entry)."""
    if ins is None:
        return False
    m = ins.mnemonic
    want = {X.Mnemonic.INT3: 3, X.Mnemonic.INTO: 4}.get(m)
    if m == X.Mnemonic.INT:
        want = ins.immediate(0)
    return want is not None and c.trail[-1][0] == want


def step(c) -> None:
    """One instruction with breakpoints armed (see the module doc); every
    #DB it raises is delivered.  Raises TripleFault."""
    la = (c.sb[1] + c.rip) & c.ipmask
    held, c.db_held = c.db_held, 0            # a data breakpoint the mov/pop ss before matched
    if c.rip != c.rf_rip:
        hit = exec_hits(c, la)
        if hit:
            c.dr[6] = (c.dr[6] & ~0xF) | hit | held
            c.deliver(GuestFault(DB))         # a fault: RIP stays on the instruction
            return
    ins = _decode(c, la)
    watch = data_hits(c, ins) if ins is not None else 0
    single = c.rf & F.TF
    before, rip = c.deliveries, c.rip
    c.ss_shadow = c.step_owned = False
    c.execute_one()
    if c.deliveries != before:
        if held and _entered_by(c, ins):
            c.dr[6] = (c.dr[6] & ~0xF) | held     # at the handler's first instruction
            c.deliver(GuestFault(DB))
        return                                # it faulted or trapped itself
    if c.rf_rip == rip:
        c.rf_rip = -1                         # RF clears when the instruction it covered completes
    if c.step_owned:
        single = 0                            # syscall/sysret test TF themselves (system.py)
    if c.ss_shadow:
        # SDM Vol. 3, 6.8.3: after a mov/pop ss, debug exceptions wait for the
        # end of the next instruction, the data breakpoints the mov/pop ss
        # matched included; DR6 then reports those and the next one's.
        single = 0                            # the step traps after the next instruction
        c.db_held, watch = watch | held, 0
    else:
        watch |= held
    if watch or single:
        if watch:
            c.dr[6] = (c.dr[6] & ~0xF) | watch
        if single:
            c.dr[6] |= DR6_BS
        c.deliver(GuestFault(DB))             # a trap: RIP after the instruction
