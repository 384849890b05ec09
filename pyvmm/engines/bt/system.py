"""Sensitive and privileged instructions: helpers that work on the virtual
CPU and the buses, and the emitters that call them.

Every helper runs with the CPU object fully up to date (see Gen.helper) and
raises GuestFault (#GP at CPL > 0, #UD, ...) before changing state."""

from __future__ import annotations

import logging
import time

import iced_x86 as X

from . import flags as F
from .cpuidbits import CR4_OSXSAVE, OSXSAVE
from .faults import DB, GP, UD, GuestFault
from .rng import rdrand
from .gen import MASK, SEG_INDEX, GPR, Gen, Unsupported
from .string import run_string
from .xstate import area_size
from .sysregs import canonical, check_cr0, check_cr3, check_cr4, check_cr8, check_efer

log = logging.getLogger(__name__)
M = X.Mnemonic
Rg = X.Register

MSR_EFER, MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS = 0xC0000080, 0xC0000100, 0xC0000101, 0xC0000102
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_TSC, MSR_TSC_AUX = 0x10, 0xC0000103

MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_PAT, MSR_MISC_ENABLE, MSR_MTRRCAP, MSR_MTRR_DEF = 0x277, 0x1A0, 0xFE, 0x2FF
MSR_APIC_BASE, MSR_TSC_DEADLINE, MSR_TSC_ADJUST = 0x1B, 0x6E0, 0x3B
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 0x1, 0x100, 0x400, 0x800

# MSRs kept as plain storage: index -> value at reset. Everything else that
# is not handled below raises #GP, as on a CPU without it.
STORED_MSRS = {
    MSR_STAR: 0, MSR_LSTAR: 0, MSR_CSTAR: 0, MSR_FMASK: 0, MSR_KERNEL_GS: 0, MSR_TSC_AUX: 0,
    MSR_SYSENTER_CS: 0, MSR_SYSENTER_ESP: 0, MSR_SYSENTER_EIP: 0,
    MSR_PAT: 0x0007040600070406, MSR_MISC_ENABLE: 0x1,    # fast strings enabled
    MSR_MTRR_DEF: 0xC06,                                     # MTRRs and fixed MTRRs on, WB
    0x250: 0x0606060606060606, 0x258: 0x0606060606060606, 0x259: 0x0606060606060606,
    **{i: 0x0606060606060606 for i in range(0x268, 0x270)},  # fixed-range MTRRs: WB
    **{i: 0 for i in range(0x200, 0x210)},                   # variable MTRRs (none in use)
    0x8B: 0,        # IA32_BIOS_SIGN_ID (microcode revision)
    0x1D9: 0,       # IA32_DEBUGCTL
}
# MSRs that hold a linear address: a non-canonical value raises #GP(0)
# (SDM WRMSR; SYSENTER_EIP/ESP on every CPU with Intel 64).
CANONICAL_MSRS = frozenset({MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS, MSR_LSTAR, MSR_CSTAR,
                            MSR_SYSENTER_ESP, MSR_SYSENTER_EIP})
READ_ONLY_MSRS = {
    MSR_MTRRCAP: 0x100 | 0x400,    # fixed MTRRs and write-combining, 0 variable ranges
    0x17: 0,                        # IA32_PLATFORM_ID
    0x3A: 1,                        # IA32_FEATURE_CONTROL: locked, no VMX
}

def _need_cpl0(c) -> None:
    if c.cpl > 0:
        raise GuestFault(GP, 0)


def _iopl_ok(c) -> bool:
    return not c.protected or c.cpl <= (c.rf >> 12) & 3


def iocheck(c, port: int = -1) -> None:
    """#GP for I/O above IOPL, except to a port in c.io_open (the VMware
    backdoor's ports, open to every CPL as on VMware; devices/vmware_install.py)."""
    if not _iopl_ok(c) and port not in getattr(c, "io_open", ()):
        raise GuestFault(GP, 0)


def port_in(c, port: int, size: int) -> int:
    return c.io.read(port, size) & MASK[size]


def port_out(c, port: int, size: int, v: int) -> None:
    c.io.write(port, size, v & MASK[size])


def live_bits(c, leaf: int, sub: int, regs: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """A CpuidTable answer with the bits that follow vCPU c's state: OSXSAVE
    (CR4.OSXSAVE, where XSAVE is offered), the XSAVE area size for the
    current XCR0 (0xD.0:EBX) and for XCR0 in the compacted form (0xD.1:EBX)."""
    a, b, cx, d = regs
    if leaf == 1 and cx >> 26 & 1 and c.cr4 & CR4_OSXSAVE:
        cx |= OSXSAVE
    elif leaf == 0xD and sub in (0, 1) and a:
        b = area_size(c.xcr0)
    return a, b, cx, d


def cpuid(c) -> None:
    leaf = c.R[0] & 0xFFFFFFFF
    sub = c.R[1] & 0xFFFFFFFF
    a, b, cc, d = live_bits(c, leaf, sub, c.cpuid.lookup(leaf, sub))
    c.R[0], c.R[3], c.R[1], c.R[2] = a, b, cc, d


def tsc(c) -> int:
    """The guest TSC: the GuestClock's (2 GHz) plus this vCPU's offset."""
    if c.clock is not None:
        return (c.clock.tsc() + c.tsc_offset) & MASK[8]
    return (time.perf_counter_ns() + c.tsc_offset) & MASK[8]


PAUSE_NS = 1000   # deterministic guest time one PAUSE takes (a spin-wait skips ahead)


def pause(c) -> None:
    """PAUSE: the spin-wait hint.  Under deterministic time the guest clock
    jumps PAUSE_NS, so delay loops (delay_tsc spins on RDTSC with PAUSE)
    finish in few iterations; with several vCPUs the spinning one yields
    its slice (pause-loop exiting), so the one it waits for can run."""
    clk = c.clock
    if clk is not None and clk.deterministic:
        clk.advance_ns(PAUSE_NS)
    if c.yield_on_pause:
        c.pending = True


def _stored(c, idx: int) -> int:
    v = c.msrs.get(idx)
    return STORED_MSRS[idx] if v is None else v


def rdmsr(c, idx: int) -> int:
    """rdmsr. Raises GuestFault(#GP) for an MSR this CPU does not have."""
    if idx == MSR_EFER:
        return c.efer
    if idx == MSR_FS_BASE:
        return c.sb[4]
    if idx == MSR_GS_BASE:
        return c.sb[5]
    if idx == MSR_TSC:
        return tsc(c)
    if idx == MSR_TSC_ADJUST:
        return c.msrs.get(MSR_TSC_ADJUST, 0)
    if idx in STORED_MSRS:
        return _stored(c, idx)
    if idx in READ_ONLY_MSRS:
        return READ_ONLY_MSRS[idx]
    if c.lapic is not None:
        v = c.lapic.read_msr(idx)
        if v is not None:
            return v
    if getattr(c, "pv", None) is not None and idx == c.pv_msr:   # paravirt hypercall page
        return c.pv.read_msr(c.index)
    kvm = getattr(c, "kvm_pv", None)                 # KVM's paravirtual MSRs (kvmpv.py)
    if kvm is not None and kvm.handles(idx):
        v = kvm.read_msr(idx)
        if v is not None:
            return v
    log.debug("bt: rdmsr %#x: #GP", idx)
    raise GuestFault(GP, 0)


def _tsc_moved(c) -> None:
    kvm = getattr(c, "kvm_pv", None)
    if kvm is not None:
        kvm.tsc_changed()                 # kvmclock's (tsc, ns) pair follows the TSC


def wrmsr(c, idx: int, v: int) -> None:
    """wrmsr. Raises GuestFault(#GP) for an unknown MSR or a bad value."""
    if idx == MSR_EFER:
        check_efer(c, v)
        c.efer = (v & ~EFER_LMA) | (c.efer & EFER_LMA)
        c.update_mode()
    elif idx in CANONICAL_MSRS and not canonical(v):
        raise GuestFault(GP, 0)
    elif idx == MSR_FS_BASE:
        c.sb[4] = v
    elif idx == MSR_GS_BASE:
        c.sb[5] = v
    elif idx == MSR_TSC:
        old = tsc(c)
        c.tsc_offset += v - old
        c.msrs[MSR_TSC_ADJUST] = (c.msrs.get(MSR_TSC_ADJUST, 0) + v - old) & MASK[8]
        _tsc_moved(c)
    elif idx == MSR_TSC_ADJUST:
        c.tsc_offset += v - c.msrs.get(MSR_TSC_ADJUST, 0)
        c.msrs[MSR_TSC_ADJUST] = v
        _tsc_moved(c)
    elif idx in STORED_MSRS:
        c.msrs[idx] = v
    elif idx in READ_ONLY_MSRS and idx != MSR_MTRRCAP:
        pass                            # writes ignored (microcode loaders, feature locks)
    elif c.lapic is not None and c.lapic.write_msr(idx, v):
        pass
    elif getattr(c, "pv", None) is not None and idx == c.pv_msr and c.pv.write_msr(c.index, v):
        pass                            # paravirt hypercall page (paravirt/install.py)
    elif getattr(c, "kvm_pv", None) is not None and c.kvm_pv.handles(idx) and c.kvm_pv.write_msr(idx, v):
        pass                            # KVM's paravirtual MSRs (kvmpv.py)
    else:
        log.debug("bt: wrmsr %#x <- %#x: #GP", idx, v)
        raise GuestFault(GP, 0)


def write_cr(c, n: int, v: int) -> None:
    """mov to CRn with the mode changes it implies. Raises #GP on bad values."""
    if c.mode[0] != 64:
        v &= 0xFFFFFFFF                 # a 32-bit operand outside 64-bit mode
    if n == 0:
        check_cr0(c, v)
        v |= 0x10                       # ET is hardwired to 1
        old = c.cr0
        c.cr0 = v & 0xFFFFFFFF
        if (v ^ old) & (1 << 31):
            if v & (1 << 31) and c.efer & 0x100:
                c.efer |= 0x400   # LMA
            elif not v & (1 << 31):
                c.efer &= ~0x400
        if not v & 1:
            c.cpl = 0
        if (v ^ old) & 0x80010000:      # PG or WP: the TLB is flushed
            c.mmu.tlb_flush()
        c.update_mode()
    elif n == 2:
        c.cr2 = v
    elif n == 3:
        check_cr3(c, v)
        v &= 0x000FFFFFFFFFFFFF
        m = c.mmu
        if v == c.cr3 == m.cr3 and c.mode[2] == c.cpl:
            # mode and address space unchanged: only the TLB flush is left
            # (update_mode would select the same space and maps again)
            m.cr3_loaded()
            if not m.shadow:
                c.jmp.clear()
            return
        c.cr3 = v
        m.cr3_loaded()
        c.update_mode()
    elif n == 4:
        check_cr4(c, v)
        if (v ^ c.cr4) & 0x3000B0:      # PSE, PAE, PGE, SMEP, SMAP: the TLB is flushed
            c.mmu.tlb_flush()
        c.cr4 = v
        c.update_mode()
    elif n == 8:
        check_cr8(v)
        c.cr8 = v
        if c.lapic is not None:         # CR8 is TPR[7:4] (SDM Vol. 3, 11.8.6.1)
            c.lapic.write_reg(0x80, v << 4)
    else:
        raise GuestFault(UD)


DR6_FIXED1, DR6_FIXED0 = 0xFFFF0FF0, 0x1000     # reserved bits of DR6 (no RTM, no bus lock)
DR7_FIXED1, DR7_FIXED0 = 0x400, 0xD800           # reserved bits of DR7 (no RTM)
DR7_GD, DR6_BD = 1 << 13, 1 << 13
CR4_DE = 1 << 3


def _dr_index(c, n: int) -> int:
    """DR4/DR5 are DR6/DR7 unless CR4.DE is set, when they raise #UD."""
    if n in (4, 5):
        if c.cr4 & CR4_DE:
            raise GuestFault(UD)
        return n + 2
    return n


def write_dr(c, n: int, v: int) -> None:
    """mov to DRn: #GP(0) for bits 63:32 of DR6/DR7; reserved bits keep
    their fixed values."""
    n = _dr_index(c, n)
    _general_detect(c)
    if n >= 6:
        if v >> 32:
            raise GuestFault(GP, 0)
        v = (v | DR6_FIXED1) & ~DR6_FIXED0 if n == 6 else (v | DR7_FIXED1) & ~DR7_FIXED0
    elif c.mode[0] != 64:
        v &= 0xFFFFFFFF
    c.dr[n] = v
    if n == 7:
        c.pending = True                # breakpoints on or off: the dispatcher picks the path (debugregs.py)


def read_dr(c, n: int) -> int:
    n = _dr_index(c, n)
    _general_detect(c)
    return c.dr[n]


def _general_detect(c) -> None:
    """DR7.GD: any MOV DR is a #DB fault, with DR6.BD set and GD cleared
    so the handler may use the debug registers (SDM Vol. 3, 18.2.4)."""
    if c.dr[7] & DR7_GD:
        c.dr[7] &= ~DR7_GD
        c.dr[6] |= DR6_BD
        raise GuestFault(DB)


def read_cr(c, n: int) -> int:
    if n == 8 and c.lapic is not None:
        return c.lapic.tpr >> 4
    return {0: c.cr0, 2: c.cr2, 3: c.cr3, 4: c.cr4, 8: c.cr8}[n]


def load_dtr(c, which: str, la: int, opsize: int) -> None:
    limit = c.rd(la, 2)
    base = c.rd(la + 2, 8 if c.mode[0] == 64 else 4)
    if c.mode[0] != 64 and opsize == 2:
        base &= 0xFFFFFF
    tbl = getattr(c, which)
    tbl.base, tbl.limit = base, limit


def store_dtr(c, which: str, la: int) -> None:
    tbl = getattr(c, which)
    c.wr(la, 2, tbl.limit)
    c.wr(la + 2, 8 if c.mode[0] == 64 else 4, tbl.base)


def ltr(c, sel: int) -> None:
    if sel & 0xFFFC == 0 or sel & 4:
        raise GuestFault(GP, sel & 0xFFFC)
    d, addr = c.read_descriptor(sel)
    hi = c.rd(addr + 8, 4) if c.mode[0] == 64 else 0
    s = c.segment_from(sel, d, hi)
    if s.s or s.type not in (1, 9):
        raise GuestFault(GP, sel & 0xFFFC)
    c.wr(addr + 5, 1, ((d >> 40) & 0xFF) | 2)  # busy
    s.type |= 2
    c.tr = s


def lldt(c, sel: int) -> None:
    if sel & 0xFFFC == 0:
        c.ldt.selector, c.ldt.base, c.ldt.limit, c.ldt.unusable = sel, 0, 0, 1
        return
    d, addr = c.read_descriptor(sel)
    hi = c.rd(addr + 8, 4) if c.mode[0] == 64 else 0
    s = c.segment_from(sel, d, hi)
    if s.s or s.type != 2:
        raise GuestFault(GP, sel & 0xFFFC)
    c.ldt = s


def halt(c) -> None:
    _need_cpl0(c)
    c.halted = True


def cli_sti(c, on: bool) -> None:
    if not _iopl_ok(c):
        raise GuestFault(GP, 0)
    if on and not c.rf & F.IF:
        c.shadow_int = True             # no interrupt before the next instruction
        c.shadow_rip = -1               # the block ends here: the next one is at RIP
        c.rf |= F.IF
        c.irq_window()
    c.rf = (c.rf | F.IF) if on else (c.rf & ~F.IF)


def softint(c, vec: int, next_rip: int) -> None:
    c.deliver(GuestFault(vec), next_rip=next_rip, software=True)


def icebp(c, next_rip: int) -> None:
    """int1 (ICEBP, 0xF1): a #DB trap delivered as a hardware exception (no
    gate DPL check, no error code), returning after the instruction."""
    c.deliver(GuestFault(1), next_rip=next_rip)


def pushf(c, size: int) -> None:
    c.push(c.pushf_value() & MASK[size], size)


def popf(c, size: int) -> None:
    c.popf(c.pop(size), size)


def enter(c, size: int, alloc: int, level: int) -> None:
    sm = c.sp_mask()
    bp_mask = MASK[size]
    c.push(c.R[5] & bp_mask, size)
    frame = c.R[4] & sm
    for i in range(1, level):
        c.R[5] = (c.R[5] & ~sm) | ((c.R[5] - size) & sm)
        c.push(c.rd(c.sb[2] + (c.R[5] & sm), size), size)
    if level:
        c.push(frame, size)
    c.R[5] = frame if size >= 4 else (c.R[5] & ~0xFFFF) | frame
    c.R[4] = (c.R[4] & ~sm) | ((frame - alloc) & sm)


def far(c, kind: str, size: int, sel: int, off: int, n: int, next_rip: int) -> None:
    if kind == "ret":
        ip = c.pop(size)
        cs = c.pop(size) & 0xFFFF
        c.load_cs(cs) if not c.protected or (cs & 3) == c.cpl else c.load_cs(cs, cs & 3)
        sm = c.sp_mask()
        c.R[4] = (c.R[4] & ~sm) | ((c.R[4] + n) & sm)
        c.rip = ip
        return
    old_cs = c.seg[1].selector
    c.load_cs(sel, c.cpl if c.protected else None)
    if kind == "call":
        c.push(old_cs, size)
        c.push(next_rip, size)
    c.rip = off & MASK[size]


def cmpxchg_wide(c, la: int, size: int) -> None:
    """cmpxchg8b (size 4) / cmpxchg16b (size 8) at linear address la."""
    m = MASK[size]
    bits = size * 8
    if size == 8 and la & 15:
        raise GuestFault(GP, 0)
    cur = c.rd(la, size) | (c.rd(la + size, size) << bits)
    exp = (c.R[0] & m) | ((c.R[2] & m) << bits)
    fw = F.flags_word(*c.lf)
    if cur == exp:
        new = (c.R[3] & m) | ((c.R[1] & m) << bits)
        c.wr(la, size, new & m)
        c.wr(la + size, size, new >> bits)
        c.lf = (F.RAW * 4, fw | F.ZF, 0, 0)
    else:
        c.wr(la, size, cur & m)
        c.wr(la + size, size, cur >> bits)
        c.R[0] = cur & m
        c.R[2] = cur >> bits
        c.lf = (F.RAW * 4, fw & ~F.ZF, 0, 0)


def _single_step_after(c) -> None:
    """SYSCALL and SYSRET test RFLAGS.TF when they complete, not when they
    start (QEMU's TCG does the same, and Linux's 64-bit entry code returns
    with IRET, not SYSRET, when the user's RFLAGS has TF, since SYSRET would
    trap at once in user mode).  So a TF that IA32_FMASK clears
    gives no #DB at the kernel entry, one it leaves set gives a #DB there
    (DR6.BS, RIP = the entry), and SYSRET with TF in R11 traps at the user
    instruction before it runs.  The trap, a single-step trap of SDM Vol. 3,
    18.3.1.4, is delivered here; the step paths add none (step_owned)."""
    c.step_owned = True
    if c.rf & F.TF:
        c.dr[6] |= 1 << 14              # DR6.BS
        c.deliver(GuestFault(DB))


def syscall(c, next_rip: int) -> None:
    # Intel: only in 64-bit mode (AMD also takes it in compatibility and legacy mode, via CSTAR/STAR).
    if not c.efer & 1 or c.mode[0] != 64:
        raise GuestFault(UD)
    star = c.msrs.get(MSR_STAR, 0)
    c.R[1] = next_rip
    c.R[11] = c.rflags & ~F.RF
    c.set_rflags(c.rflags & ~c.msrs.get(MSR_FMASK, 0))
    from ...cpu import Segment
    sel = (star >> 32) & 0xFFFC
    c.seg[1] = Segment(selector=sel, base=0, limit=0xFFFFFFFF, type=0xB, dpl=0, l=1, db=0, g=1)
    c.seg[2] = Segment(selector=sel + 8, base=0, limit=0xFFFFFFFF, type=3, dpl=0, db=1, g=1)
    c.sb[1] = c.sb[2] = 0
    c.cpl = 0
    c.update_mode()
    c.rip = c.msrs.get(MSR_LSTAR, 0)
    _single_step_after(c)


def sysret(c, size: int) -> None:
    if not c.efer & 1 or c.mode[0] != 64:
        raise GuestFault(UD)
    _need_cpl0(c)
    if size == 8 and not canonical(c.R[1]):
        # Intel faults here, still at CPL0 on the kernel's stack (AMD faults after the switch to CPL3).
        raise GuestFault(GP, 0)
    from ...cpu import Segment
    star = c.msrs.get(MSR_STAR, 0)
    base = (star >> 48) & 0xFFFF
    if size == 8:
        c.seg[1] = Segment(selector=(base + 16) | 3, base=0, limit=0xFFFFFFFF, type=0xB, dpl=3, l=1, db=0, g=1)
        c.rip = c.R[1]
    else:
        c.seg[1] = Segment(selector=base | 3, base=0, limit=0xFFFFFFFF, type=0xB, dpl=3, db=1, g=1)
        c.rip = c.R[1] & 0xFFFFFFFF
    c.seg[2] = Segment(selector=(base + 8) | 3, base=0, limit=0xFFFFFFFF, type=3, dpl=3, db=1, g=1)
    c.sb[1] = c.sb[2] = 0
    c.set_rflags((c.R[11] & 0x3C7FD7) | 2)
    c.cpl = 3
    c.update_mode()
    if c.rf & F.IF:
        c.irq_window()
    if c.rf & F.TF:
        c.pending = True                # single-step from the next instruction on (smp.py)
    _single_step_after(c)


def sysenter(c) -> None:
    """SYSENTER as on Intel 64: valid in long mode too (AMD: #UD there), where
    it enters 64-bit mode at CPL0 with all 64 bits of SYSENTER_EIP/ESP."""
    msr = c.msrs.get(MSR_SYSENTER_CS, 0)
    if not c.protected or not msr & 0xFFFC:
        raise GuestFault(GP, 0)
    from ...cpu import Segment
    lm = c.long_mode
    sel = msr & 0xFFFC
    c.set_rflags(c.rflags & ~(F.VM | F.IF | F.RF))
    c.seg[1] = Segment(selector=sel, base=0, limit=0xFFFFFFFF, type=0xB, dpl=0, l=int(lm), db=int(not lm), g=1)
    c.seg[2] = Segment(selector=sel + 8, base=0, limit=0xFFFFFFFF, type=3, dpl=0, db=1, g=1)
    c.sb[1] = c.sb[2] = 0
    mask = MASK[8] if lm else 0xFFFFFFFF
    c.R[4] = c.msrs.get(MSR_SYSENTER_ESP, 0) & mask
    c.cpl = 0
    c.update_mode()
    c.rip = c.msrs.get(MSR_SYSENTER_EIP, 0) & mask


def sysexit(c, size: int) -> None:
    """SYSEXIT to CPL3: with REX.W (size 8) to 64-bit mode at RDX with
    stack RCX (Intel 64; AMD has no SYSEXIT in long mode), else to 32-bit
    code at EDX with stack ECX."""
    msr = c.msrs.get(MSR_SYSENTER_CS, 0)
    if not c.protected or not msr & 0xFFFC or c.cpl:
        raise GuestFault(GP, 0)
    if size == 8 and not (canonical(c.R[1]) and canonical(c.R[2])):
        raise GuestFault(GP, 0)
    from ...cpu import Segment
    sel = ((msr + (32 if size == 8 else 16)) & 0xFFFF) | 3
    c.seg[1] = Segment(selector=sel, base=0, limit=0xFFFFFFFF, type=0xB, dpl=3, l=int(size == 8),
                       db=int(size != 8), g=1)
    c.seg[2] = Segment(selector=(sel + 8) & 0xFFFF, base=0, limit=0xFFFFFFFF, type=3, dpl=3, db=1, g=1)
    c.sb[1] = c.sb[2] = 0
    mask = MASK[8] if size == 8 else 0xFFFFFFFF
    c.R[4] = c.R[1] & mask
    c.cpl = 3
    c.update_mode()
    c.rip = c.R[2] & mask
    if c.rf & F.IF:
        c.irq_window()
    if c.rf & F.TF:
        c.pending = True


def swapgs(c) -> None:
    _need_cpl0(c)
    if c.mode[0] != 64:
        raise GuestFault(UD)
    c.sb[5], c.msrs[MSR_KERNEL_GS] = c.msrs.get(MSR_KERNEL_GS, 0), c.sb[5]


HELPERS = {"IOCHECK": iocheck, "PORT_IN": port_in, "PORT_OUT": port_out, "CPUID": cpuid,
           "RDMSR": rdmsr, "WRMSR": wrmsr, "WRITE_CR": write_cr, "READ_CR": read_cr,
           "WRITE_DR": write_dr, "READ_DR": read_dr,
           "LOAD_DTR": load_dtr, "STORE_DTR": store_dtr, "LTR": ltr, "LLDT": lldt, "HALT": halt,
           "CLI_STI": cli_sti, "SOFTINT": softint, "ICEBP": icebp, "PUSHF": pushf, "POPF": popf,
           "ENTER": enter,
           "FAR": far, "CMPXCHGW": cmpxchg_wide, "SYSCALL": syscall, "SYSRET": sysret,
           "SYSENTER": sysenter, "SYSEXIT": sysexit,
           "SWAPGS": swapgs, "STRING": run_string, "TSC": tsc, "NEED_CPL0": _need_cpl0,
           "PAUSE": pause, "RDRAND": rdrand}
