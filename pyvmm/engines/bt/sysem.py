"""Emitters for sensitive and privileged instructions (helpers in system.py)."""

from __future__ import annotations

import iced_x86 as X

from .ctrl import _exit
from .facts import Fact
from .gen import GPR, MASK, SEG_INDEX, Gen, Unsupported

M = X.Mnemonic
Rg = X.Register
_CR = {getattr(Rg, f"CR{i}"): i for i in (0, 2, 3, 4, 8)}
_DR = {getattr(Rg, f"DR{i}"): i for i in range(8)}


def _end(g: Gen) -> None:
    _exit(g, f"{g.ins.next_ip:#x}")


def _mov_special(g: Gen) -> bool:
    """mov to/from CRn, DRn and segment registers; False if not one."""
    ins = g.ins
    r0 = ins.op0_register if g.is_reg(0) else None
    r1 = ins.op1_register if g.is_reg(1) else None
    if r0 in _CR:
        n = _CR[r0]
        if n == 3 and g.cpl == 0:
            # same mode and (shadow) address space afterwards: the block goes on
            # write_cr reads no GPR, flag or RIP: no state sync; a fault
            # (n >= 0) writes the locals back.  Same maps: TR/TW still valid.
            # An unchanged CR3 in shadow mode (the usual case: a kernel
            # flushing its TLB) only counts the flush: same space, same maps.
            # unmasked: a value with bits past MAXPHYADDR takes the checked path
            g.emit(f"v = {g.rreg(r1)}")
            g.emit("if v == c.cr3 == c.mmu.cr3 and c.mmu.shadow:")
            g.emit("    c.mmu.cr3_loaded()")   # syncs out-of-sync page tables
            g.emit("else:")
            g.ind += 1
            g.emit("mp = c.mmu.maps")
            g.fault()
            g.emit(f"WRITE_CR(c, 3, {g.rreg(r1)})")
            g.emit(f"if c.mmu.maps is not mp or not c.mmu.shadow or c.mode != {tuple(c_mode(g))!r} or c.pending:")
            g.ind += 1
            _end(g)
            g.ind -= 2
            g.ends = False
            return True
        g.helper(f"NEED_CPL0(c); WRITE_CR(c, {n}, R[{GPR[r1][0]}])")
        _end(g)
    elif r1 in _CR and g.cpl == 0 and _CR[r1] != 8:
        g.wreg(r0, f"c.cr{_CR[r1]}")     # CPL0 is part of the translation key
    elif r1 in _CR:
        g.helper(f"NEED_CPL0(c); R[{GPR[r0][0]}] = READ_CR(c, {_CR[r1]})")
    elif r0 in _DR:
        g.helper(f"NEED_CPL0(c); WRITE_DR(c, {_DR[r0]}, R[{GPR[r1][0]}])")
        _end(g)                      # DR7 may arm breakpoints (debugregs.py)
    elif r1 in _DR:
        g.helper(f"NEED_CPL0(c); R[{GPR[r0][0]}] = READ_DR(c, {_DR[r1]})")
    elif r0 in SEG_INDEX:
        if r0 == Rg.CS:
            raise Unsupported("mov cs")
        g.emit(f"v = {g.read(1, 2)}")
        g.helper(f"c.load_seg({SEG_INDEX[r0]}, v)")
        _end(g)
    elif r1 in SEG_INDEX:
        g.bind("c")
        size = g.size(0) if g.is_reg(0) else 2
        g.write(0, f"c.seg[{SEG_INDEX[r1]}].selector", size)
    else:
        return False
    return True


# lds/les/lfs/lgs/lss r, m16:16 or m16:32: which segment register each loads.
_FAR_LOADS = {M.LDS: Rg.DS, M.LES: Rg.ES, M.LFS: Rg.FS, M.LGS: Rg.GS, M.LSS: Rg.SS}


def _load_far(g: Gen) -> None:
    """Loads a far pointer: the offset (operand size) then the selector
    after it.  The segment is loaded first, so a selector that faults
    leaves the register unchanged, as on the CPU."""
    size = g.size(0)
    g.addr()
    g.load("off", size)
    g.emit(f"a2 = (a + {size}) & 0xFFFFFFFFFFFFFFFF")
    g.load("sel", 2, la="a2")
    g.helper(f"c.load_seg({SEG_INDEX[_FAR_LOADS[g.ins.mnemonic]]}, sel)")
    g.wreg(g.ins.op0_register, "off")
    _end(g)   # segment bases are part of the translation


def _mov(g: Gen) -> None:
    from .alu import _mov as plain
    if not _mov_special(g):
        plain(g)


def _io(g: Gen) -> None:
    ins = g.ins
    m = ins.mnemonic
    if m == M.IN:
        size = g.size(0)
        port = f"{ins.immediate(1) & 0xFF}" if g.is_imm(1) else "R[2] & 0xFFFF"
        acc = {1: 0, 2: 0, 4: 0}[size]
        keep = "" if size == 4 else f"(R[0] & ~{MASK[size]:#x}) | "
        g.helper(f"IOCHECK(c, {port}); R[0] = {keep}PORT_IN(c, {port}, {size})")
    else:
        size = g.size(1)
        port = f"{ins.immediate(0) & 0xFF}" if g.is_imm(0) else "R[2] & 0xFFFF"
        g.helper(f"IOCHECK(c, {port}); PORT_OUT(c, {port}, {size}, R[0])")
    _end(g)  # device side effects (stop requests, interrupts) are seen promptly


def _hlt(g: Gen) -> None:
    g.helper("HALT(c)")
    _end(g)


def c_mode(g: Gen) -> tuple[int, int, int]:
    return (g.bits, g.sbits, g.cpl)


def _cli(g: Gen) -> None:
    if g.cpl == 0:
        # CPL0 always passes the IOPL check (the CPL is part of the key)
        if g.ins.mnemonic == M.CLI:
            g.emit("c.rf &= ~0x200")
            return
        # the shadow covers the next instruction only: it is kept with its
        # RIP, since this block may run on past it (smp.py)
        g.emit("if not c.rf & 0x200:")
        g.emit(f"    c.shadow_int = True; c.shadow_rip = {g.ins.next_ip:#x}")
        g.emit("    c.rf |= 0x200")
        g.emit("    c.irq_window()")
        g.emit("if c.pending:")
        g.ind += 1
        _end(g)
        g.ind -= 1
        g.ends = False
        return
    g.helper(f"CLI_STI(c, {g.ins.mnemonic == M.STI})")
    _end(g)


def _cpuid(g: Gen) -> None:
    g.helper("CPUID(c)")


def _rdtsc(g: Gen) -> None:
    aux = g.ins.mnemonic == M.RDTSCP
    g.helper("t = TSC(c); R[0] = t & 0xFFFFFFFF; R[2] = t >> 32"
             + ("; R[1] = c.msrs.get(0xC0000103, 0) & 0xFFFFFFFF" if aux else ""))


def _rdrand(g: Gen) -> None:
    num, size, _ = GPR[g.ins.op0_register]
    g.helper(f"RDRAND(c, {num}, {size})")


def _msr(g: Gen) -> None:
    if g.ins.mnemonic == M.RDMSR:
        g.helper("NEED_CPL0(c); t = RDMSR(c, R[1] & 0xFFFFFFFF); R[0] = t & 0xFFFFFFFF; R[2] = t >> 32")
    else:
        g.helper("NEED_CPL0(c); WRMSR(c, R[1] & 0xFFFFFFFF, (R[0] & 0xFFFFFFFF) | (R[2] & 0xFFFFFFFF) << 32)")
        _end(g)


def _dtr(g: Gen) -> None:
    m = g.ins.mnemonic
    which = "gdt" if m in (M.LGDT, M.SGDT) else "idt"
    g.addr()
    if m in (M.LGDT, M.LIDT):
        osz = 4 if g.bits != 16 else 2
        g.helper(f"NEED_CPL0(c); LOAD_DTR(c, {which!r}, a, {osz})")
        _end(g)
    else:
        g.helper(f"STORE_DTR(c, {which!r}, a)")


def _ldt_tr(g: Gen) -> None:
    m = g.ins.mnemonic
    if m in (M.LTR, M.LLDT):
        g.emit(f"v = {g.read(0, 2)}")
        g.helper(f"NEED_CPL0(c); {'LTR' if m == M.LTR else 'LLDT'}(c, v)")
        _end(g)
    else:
        g.bind("c")
        src = "c.tr.selector" if m == M.STR else "c.ldt.selector"
        g.write(0, src, g.size(0) if g.is_reg(0) else 2)


def _smsw(g: Gen) -> None:
    g.bind("c")
    size = g.size(0) if g.is_reg(0) else 2
    g.write(0, f"c.cr0 & {MASK[size]:#x}", size)


def _lmsw(g: Gen) -> None:
    g.emit(f"v = {g.read(0, 2)}")
    g.helper("NEED_CPL0(c); WRITE_CR(c, 0, (c.cr0 & ~0xE) | (v & 0xF) | (c.cr0 & 1))")
    _end(g)


def _clts(g: Gen) -> None:
    g.helper("NEED_CPL0(c); c.cr0 &= ~8")


def _invlpg(g: Gen) -> None:
    g.addr()
    g.helper("NEED_CPL0(c); c.mmu.invlpg(a)")
    _end(g)


def _wbinvd(g: Gen) -> None:
    g.helper("NEED_CPL0(c)")


def _cmpxchgw(g: Gen) -> None:
    g.addr()
    size = 8 if g.ins.mnemonic == M.CMPXCHG16B else 4
    g.helper(f"CMPXCHGW(c, a, {size})")


def _syscall(g: Gen) -> None:
    m = g.ins.mnemonic
    if m == M.SYSCALL:
        g.helper(f"SYSCALL(c, {g.ins.next_ip:#x})")
    elif m == M.SYSRETQ or m == M.SYSRET:
        g.helper(f"SYSRET(c, {8 if m == M.SYSRETQ else 4})")
    else:
        g.helper("SWAPGS(c)")
        _end(g)
        return
    _exit(g, "c.rip")


def _sysenter(g: Gen) -> None:
    if g.ins.mnemonic == M.SYSENTER:
        g.helper("SYSENTER(c)")
    else:
        g.helper(f"SYSEXIT(c, {8 if g.ins.mnemonic == M.SYSEXITQ else 4})")
    _exit(g, "c.rip")


def _int1(g: Gen) -> None:
    g.helper(f"ICEBP(c, {g.ins.next_ip:#x})")
    _exit(g, "c.rip")


def _ud(g: Gen) -> None:
    raise Unsupported("ud2")


EMITTERS = {
    M.MOV: _mov, M.IN: _io, M.OUT: _io, M.HLT: _hlt, M.CLI: _cli, M.STI: _cli,
    M.CPUID: _cpuid, M.RDTSC: _rdtsc, M.RDTSCP: _rdtsc, M.RDMSR: _msr, M.WRMSR: _msr,
    M.LGDT: _dtr, M.LIDT: _dtr, M.SGDT: _dtr, M.SIDT: _dtr,
    M.LTR: _ldt_tr, M.LLDT: _ldt_tr, M.STR: _ldt_tr, M.SLDT: _ldt_tr,
    M.SMSW: _smsw, M.LMSW: _lmsw, M.CLTS: _clts, M.INVLPG: _invlpg, M.WBINVD: _wbinvd,
    M.INVD: _wbinvd, M.CMPXCHG8B: _cmpxchgw, M.CMPXCHG16B: _cmpxchgw,
    M.SYSCALL: _syscall, M.SYSRETQ: _syscall, M.SYSRET: _syscall, M.SWAPGS: _syscall,
    M.SYSENTER: _sysenter, M.SYSEXIT: _sysenter, M.SYSEXITQ: _sysenter,
    M.UD2: _ud, M.RDRAND: _rdrand, M.RDSEED: _rdrand, M.INT1: _int1,
    **{m: _load_far for m in _FAR_LOADS},
}

# This family's rows of the instruction-facts table (facts.py): every form
# counts as a helper (MOV too: its control- and debug-register forms are),
# and those that change what the translation depends on end the block.
FACTS = {m: Fact.HELPER for m in EMITTERS}
for _m in (M.HLT, M.CLI, M.STI, M.LGDT, M.LIDT, M.LTR, M.LLDT, M.LMSW, M.INVLPG, M.WRMSR, M.IN, M.OUT,
           M.SWAPGS, M.SYSCALL, M.SYSRET, M.SYSRETQ, M.SYSENTER, M.SYSEXIT, M.SYSEXITQ):
    FACTS[_m] = FACTS.get(_m, Fact.NONE) | Fact.ENDS_BLOCK
for _m in (M.CLI, M.STI):
    FACTS[_m] |= Fact.CPL0_GOES_ON
