"""The virtual CPU of the bt engine: architectural state and the slow,
rarely-run operations (segment loads, exception delivery, control registers).

Translated blocks keep the hot state in Python locals and write it back to
this object at block exits: `R` (16 GPRs), `rip`, `lf` (lazy flags, see
flags.py) and `rf` (the non-arithmetic RFLAGS bits)."""

from __future__ import annotations

import collections
import logging
from dataclasses import replace

from ...cpu import (CR0_PE, CR0_PG, CR0_WP, CR4_PAE, CR4_PSE, EFER_LMA, EFER_LME,
                    EFER_NXE, GPR_NAMES, CpuState, DescriptorTable, Segment)
from . import flags as F
from .faults import DF_, FAULT_CLASS, GP, NP, SS, TS, WITH_ERROR_CODE, GuestFault, NonCanonical
from .mmu import PG_32, PG_LONG, PG_NONE, PG_PAE, U16, U32, U64, Mmu

log = logging.getLogger(__name__)

ES, CS, SS_, DS, FS, GS = range(6)
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")
M64 = 0xFFFFFFFFFFFFFFFF
_UNPACK = {1: lambda b, o: (b[o],), 2: U16, 4: U32, 8: U64}
_DECODED: dict[tuple, Segment] = {}     # (selector, descriptor, high half) -> Segment (segment_from)


class TripleFault(Exception):
    """Delivering #DF failed: the machine resets."""


class VCpu:
    """One virtual x86 CPU for the translator."""

    def __init__(self, memory, io_bus, mmio_bus, on_code_write=lambda ppn: None,
                 guard=None, shadow: bool = False, index: int = 0):
        self.memory = memory
        self.io = io_bus
        self.index = index
        self.mmu = Mmu(memory, mmio_bus, on_code_write, guard, shadow)
        # SMAP lets explicit supervisor accesses reach user pages while
        # EFLAGS.AC is set (at CPL < 3; implicit accesses never: sys_rd/sys_wr).
        self.mmu.ac = lambda: self.cpl < 3 and bool(self.rf & 0x40000)
        self.jmp: dict[int, object] = {}   # fetch linear address -> block, for the current mode
        self.mmu.jmp = self.jmp
        self.clock = None       # GuestClock (RDTSC); None: host perf counter
        self.lapic = None       # LocalApic for the APIC MSRs; None: no APIC
        self.cpuid = None       # CpuidTable; None: the default table
        self.shadow_int = False  # interrupt shadow (after sti / mov ss)
        self.shadow_rip = -1     # RIP of the one instruction STI's shadow covers; -1: wherever RIP is
        self.ss_shadow = False   # the last instruction loaded SS (mov/pop ss): it holds #DB off too
        self.db_held = 0         # DR6.B0-B3 a mov/pop ss matched, held to after the next instruction
        self.step_owned = False  # syscall/sysret decided their own single-step trap (system.py)
        self.intc = None        # the platform's interrupt controllers (irq_window); None: none
        self.R = [0] * 16
        self.rip = 0
        self.lf = F.CLEAR
        self.rf = 2
        self.seg = [Segment() for _ in range(6)]
        self.sb = [0] * 6
        self.tr = Segment(type=0xB, s=0)
        self.ldt = Segment(type=2, s=0)
        self.gdt = DescriptorTable()
        self.idt = DescriptorTable()
        self.cr0 = 0x10
        self.cr2 = self.cr3 = self.cr4 = self.cr8 = 0
        self.efer = 0
        self.dr = [0, 0, 0, 0, 0, 0, 0xFFFF0FF0, 0x400]    # DR6/DR7 at reset
        self.msrs: dict[int, int] = {}
        self.tsc_offset = 0
        self.cpl = 0
        self.mode = (16, 16, 0)
        self.ipmask = 0xFFFFFFFF
        self.pending = False    # ask translated loops to return to the dispatcher
        self.yield_on_pause = False   # PAUSE ends the slice (set with several vCPUs)
        # The last deliveries (vector, error code, rip, cpl, cr2, external), for the
        # report when a triple fault resets the machine.
        self.trail: collections.deque = collections.deque(maxlen=12)
        self.halted = False
        self.icount = 0
        self.xmm = [0] * 16
        # Bits 255:128 of each YMM register (AVX), kept apart so that SSE code,
        # which never touches them, stays as it is.
        self.ymmh = [0] * 16
        self.xcr0 = 1           # x87 only until the guest's XSETBV
        self.mxcsr = 0x1F80
        self.fpu_env = bytes(512)
        self.rip_back = False
        # RF is not kept in `rf` (bt has no instruction breakpoints for it to
        # suppress): an IRET that loads RF=1 records where it returned to, and
        # RF ends when that instruction completes (or an event is delivered).
        self.rf_rip = -1
        self.deliveries = 0     # exceptions and interrupts delivered (single-step looks for one)

    def port_in(self, port: int, size: int) -> int:
        return self.io.read(port, size) & ((1 << (8 * size)) - 1)

    def port_out(self, port: int, size: int, v: int) -> None:
        self.io.write(port, size, v & ((1 << (8 * size)) - 1))

    # -- state transfer ----------------------------------------------------
    def load(self, st: CpuState) -> None:
        self.R = [st.regs.get(n, 0) & M64 for n in GPR_NAMES]
        self.rip = st.rip
        self.rf = (st.rflags & ~F.ARITH) | 2
        self.lf = (F.RAW * 4, st.rflags & F.ARITH, 0, 0)
        for i, name in enumerate(SEG_NAMES):
            self.seg[i] = replace(getattr(st, name))
        self.sb = [s.base for s in self.seg]
        self.tr, self.ldt = replace(st.tr), replace(st.ldt)
        self.gdt, self.idt = replace(st.gdt), replace(st.idt)
        self.cr0, self.cr2, self.cr3, self.cr4, self.cr8 = st.cr0, st.cr2, st.cr3, st.cr4, st.cr8
        self.efer = st.efer
        self.msrs = dict(st.msrs)
        self.cpl = self.seg[CS].dpl if self.cr0 & CR0_PE else 0
        if self.cr0 & CR0_PE:
            self.cpl = self.seg[CS].selector & 3 if self.seg[CS].selector else self.seg[CS].dpl
        self.update_mode()

    def save(self) -> CpuState:
        st = CpuState()
        st.regs = dict(zip(GPR_NAMES, self.R))
        st.rip = self.rip
        st.rflags = self.rflags
        for i, name in enumerate(SEG_NAMES):
            s = replace(self.seg[i])
            s.base = self.sb[i]
            setattr(st, name, s)
        st.tr, st.ldt = replace(self.tr), replace(self.ldt)
        st.gdt, st.idt = replace(self.gdt), replace(self.idt)
        st.cr0, st.cr2, st.cr3, st.cr4, st.cr8 = self.cr0, self.cr2, self.cr3, self.cr4, self.cr8
        st.efer = self.efer
        st.msrs = dict(self.msrs)
        return st

    @property
    def rflags(self) -> int:
        return (self.rf & ~F.ARITH) | F.flags_word(*self.lf) | 2

    def set_rflags(self, v: int) -> None:
        self.rf = (v & ~F.ARITH & 0x3F7FD7) | 2
        self.lf = (F.RAW * 4, v & F.ARITH, 0, 0)

    # -- modes ----------------------------------------------------------------
    @property
    def long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA)

    @property
    def protected(self) -> bool:
        return bool(self.cr0 & CR0_PE)

    def update_mode(self) -> None:
        """Recomputes the translation mode key and reconfigures the MMU."""
        self.jmp.clear()
        cs, ss = self.seg[CS], self.seg[SS_]
        if self.long_mode and cs.l:
            bits, sbits = 64, 64
        else:
            bits = 32 if (self.protected and cs.db) else 16
            sbits = 32 if (self.protected and ss.db) else 16
        self.mode = (bits, sbits, self.cpl)
        self.ipmask = M64 if bits == 64 else 0xFFFFFFFF
        if not self.cr0 & CR0_PG:
            pg = PG_NONE
        elif self.efer & EFER_LMA:
            pg = PG_LONG
        elif self.cr4 & CR4_PAE:
            pg = PG_PAE
        else:
            pg = PG_32
        self.mmu.pge = bool(self.cr4 & 0x80)    # CR4.PGE: shadow mode shares global entries
        self.mmu.smep = bool(self.cr4 & 0x100000)   # CR4.SMEP, CR4.SMAP: part of the space's key
        self.mmu.smap = bool(self.cr4 & 0x200000)
        self.mmu.configure(pg, self.cr3, bool(self.cr0 & CR0_WP), bool(self.efer & EFER_NXE),
                           self.cpl == 3, bits == 64)

    # -- memory helpers (linear addresses) -------------------------------
    def rd(self, la: int, size: int) -> int:
        m = self.mmu
        return (m.rd8 if size == 8 else m.rd4 if size == 4 else m.rd2 if size == 2 else m.rd1)(la & M64)

    def wr(self, la: int, size: int, v: int) -> None:
        m = self.mmu
        (m.wr8 if size == 8 else m.wr4 if size == 4 else m.wr2 if size == 2 else m.wr1)(
            la & M64, v & ((1 << (8 * size)) - 1))

    def sys_rd(self, la: int, size: int) -> int:
        """An implicit supervisor-mode read (IDT, GDT/LDT, TSS): allowed on
        supervisor pages even at CPL 3, as the CPU's own accesses are."""
        m = self.mmu
        if not m.user:
            if not m.smap:
                return self.rd(la, size)
            m.implicit = True           # SMAP ignores EFLAGS.AC for implicit accesses
            try:
                return self.rd(la, size)
            finally:
                m.implicit = False
        la &= M64
        e = m.pairs[0][0].get(la >> 12)     # the supervisor map: no switch to it and back
        if e is not None and la & 0xFFF <= 0x1000 - size:
            return _UNPACK[size](e[0], e[1] + (la & 0xFFF))[0]
        m.configure(m.mode, m.cr3, m.wp, m.nxe, False, m.long)
        try:
            return self.rd(la, size)
        finally:
            m.configure(m.mode, m.cr3, m.wp, m.nxe, True, m.long)

    def sys_wr(self, la: int, size: int, v: int) -> None:
        """An implicit supervisor-mode write (descriptor accessed/busy bits)."""
        m = self.mmu
        if not m.user:
            if not m.smap:
                return self.wr(la, size, v)
            m.implicit = True
            try:
                return self.wr(la, size, v)
            finally:
                m.implicit = False
        m.configure(m.mode, m.cr3, m.wp, m.nxe, False, m.long)
        try:
            self.wr(la, size, v)
        finally:
            m.configure(m.mode, m.cr3, m.wp, m.nxe, True, m.long)

    def sp_mask(self) -> int:
        return M64 if self.mode[1] == 64 else 0xFFFFFFFF if self.mode[1] == 32 else 0xFFFF

    def push(self, v: int, size: int) -> None:
        mask = self.sp_mask()
        sp = (self.R[4] - size) & mask
        self.wr(self.sb[SS_] + sp, size, v)
        self.R[4] = (self.R[4] & ~mask) | sp

    def pop(self, size: int) -> int:
        mask = self.sp_mask()
        sp = self.R[4] & mask
        v = self.rd(self.sb[SS_] + sp, size)
        self.R[4] = (self.R[4] & ~mask) | ((sp + size) & mask)
        return v

    # -- descriptors -----------------------------------------------------------
    def read_descriptor(self, sel: int, vec: int = GP) -> tuple[int, int]:
        """Returns (descriptor, its linear address). Raises #GP(sel) outside the table."""
        table = self.ldt if sel & 4 else self.gdt
        base, limit = (table.base, table.limit)
        if (sel | 7) > limit:
            raise GuestFault(vec, sel & 0xFFFC)
        addr = base + (sel & ~7)
        return self.sys_rd(addr, 8), addr

    @staticmethod
    def segment_from(sel: int, d: int, hi: int = 0) -> Segment:
        """The segment a descriptor loads (a fresh object: callers change
        its selector).  Decoded once per (selector, descriptor): every
        interrupt and iret loads the same few."""
        key = (sel, d, hi)
        proto = _DECODED.get(key)
        if proto is None:
            if len(_DECODED) >= 4096:
                _DECODED.clear()
            proto = _DECODED[key] = VCpu._decode_segment(sel, d, hi)
        s = object.__new__(Segment)
        s.__dict__.update(proto.__dict__)
        return s

    @staticmethod
    def _decode_segment(sel: int, d: int, hi: int) -> Segment:
        limit = (d & 0xFFFF) | ((d >> 32) & 0xF0000)
        g = (d >> 55) & 1
        if g:
            limit = (limit << 12) | 0xFFF
        base = ((d >> 16) & 0xFFFFFF) | (((d >> 56) & 0xFF) << 24) | (hi << 32)
        return Segment(selector=sel, base=base, limit=limit, type=(d >> 40) & 0xF,
                       s=(d >> 44) & 1, dpl=(d >> 45) & 3, present=(d >> 47) & 1,
                       avl=(d >> 52) & 1, l=(d >> 53) & 1, db=(d >> 54) & 1, g=g)

    def load_seg(self, idx: int, sel: int) -> None:
        """mov/pop to a data or stack segment register, with the protected-mode
        checks. Raises GuestFault(#GP/#NP/#SS)."""
        sel &= 0xFFFF
        if not self.protected or self.rf & F.VM:
            self.seg[idx] = Segment.real_mode(sel, code=(idx == CS))
            self.sb[idx] = sel << 4
            if idx in (CS, SS_):
                self.update_mode()
            return
        if sel & 0xFFFC == 0:
            if idx == SS_ and not (self.mode[0] == 64 and self.cpl < 3):
                raise GuestFault(GP, 0)
            self.seg[idx] = Segment(selector=sel, unusable=1, present=0, db=self.seg[idx].db if idx == SS_ else 0)
            self.sb[idx] = 0 if idx in (FS, GS) and self.mode[0] == 64 else 0
            return
        d, addr = self.read_descriptor(sel)
        s = self.segment_from(sel, d)
        rpl = sel & 3
        if idx == SS_:
            if rpl != self.cpl or s.dpl != self.cpl or not s.s or (s.type & 0xA) != 2:
                raise GuestFault(GP, sel & 0xFFFC)
            if not s.present:
                raise GuestFault(SS, sel & 0xFFFC)
        else:
            code = bool(s.type & 8)
            if not s.s or (code and not s.type & 2):
                raise GuestFault(GP, sel & 0xFFFC)
            conforming = code and s.type & 4
            if not conforming and (rpl > s.dpl or self.cpl > s.dpl):
                raise GuestFault(GP, sel & 0xFFFC)
            if not s.present:
                raise GuestFault(NP, sel & 0xFFFC)
        if not d & (1 << 40):
            self.sys_wr(addr + 5, 1, ((d >> 40) & 0xFF) | 1)
        self.seg[idx] = s
        self.sb[idx] = s.base
        if idx == SS_:
            self.shadow_int = True
            self.ss_shadow = True
            self.update_mode()

    def load_cs(self, sel: int, new_cpl: int | None = None) -> None:
        """Loads CS for a far transfer (checks: code segment, present).
        Raises GuestFault(#GP/#NP)."""
        sel &= 0xFFFF
        if not self.protected or self.rf & F.VM:
            self.seg[CS] = Segment.real_mode(sel, code=True)
            self.sb[CS] = sel << 4
            self.update_mode()
            return
        if sel & 0xFFFC == 0:
            raise GuestFault(GP, 0)
        d, addr = self.read_descriptor(sel)
        s = self.segment_from(sel, d)
        if not s.s or not s.type & 8:
            raise GuestFault(GP, sel & 0xFFFC)
        if not s.present:
            raise GuestFault(NP, sel & 0xFFFC)
        cpl = (sel & 3) if new_cpl is None else new_cpl
        if s.type & 4:
            cpl = self.cpl if new_cpl is None else new_cpl
        s.selector = (sel & ~3) | cpl
        self.seg[CS] = s
        self.sb[CS] = s.base
        if cpl != self.cpl:
            self.cpl = cpl
        self.update_mode()

    # -- exceptions and interrupts --------------------------------------------
    def deliver(self, f: GuestFault, next_rip: int | None = None, software: bool = False,
                external: bool = False) -> None:
        """Delivers an exception or interrupt through the IVT/IDT.

        rip must point at the faulting instruction (or next_rip for traps and
        int n); `external` marks a hardware interrupt or NMI (no error code,
        no gate DPL check). Raises TripleFault when even #DF cannot be
        delivered."""
        if isinstance(f, NonCanonical) and self._stack_reference(f.linear):
            f = GuestFault(SS, 0)
        if f.cr2 is not None:
            self.cr2 = f.cr2
        self.halted = False
        self.deliveries += 1
        self.trail.append((f.vector, f.error_code, self.rip, self.cpl, f.cr2, external))
        # The pushes may land on a page of translated code (a real-mode boot
        # sector's stack shares its page): that drops the translations, and
        # there is no instruction to restart.
        smc_ok, self.mmu.smc_ok = self.mmu.smc_ok, True
        try:
            self._deliver(f.vector, f.error_code, self.rip if next_rip is None else next_rip, software,
                          external)
        except GuestFault as g2:
            if f.vector == DF_:
                raise TripleFault() from None
            contributory = {0, TS, NP, SS, GP}
            if f.vector in contributory | {14} and g2.vector in contributory | {14}:
                if g2.cr2 is not None:
                    self.cr2 = g2.cr2
                self.deliver(GuestFault(DF_, 0))
            else:
                self.deliver(g2)
        finally:
            self.mmu.smc_ok = smc_ok

    def _stack_reference(self, linear: int) -> bool:
        from .stackfault import stack_reference   # late: it decodes with the translator's tables
        return stack_reference(self, linear)

    def _deliver(self, vec: int, err: int | None, ret: int, software: bool, external: bool = False) -> None:
        # RF in the image: set for faults; otherwise set only while the
        # instruction an RF=1 IRET returned to has not completed (an INT n
        # there pushes before it completes).
        old_flags = self.rflags & ~F.RF
        if (not software and not external and vec in FAULT_CLASS) or self.rip == self.rf_rip:
            old_flags |= F.RF
        self.rf_rip = -1
        if not self.protected:
            if vec * 4 + 3 > self.idt.limit:
                raise GuestFault(DF_, 0)
            off = self.sys_rd(self.idt.base + vec * 4, 2)
            sel = self.sys_rd(self.idt.base + vec * 4 + 2, 2)
            self.push(old_flags, 2)
            self.push(self.seg[CS].selector, 2)
            self.push(ret, 2)
            self.rf &= ~(F.IF | F.TF | F.AC)
            self.load_cs(sel)
            self.rip = off
            return
        if err is None and not software and not external and vec in WITH_ERROR_CODE:
            err = 0
        if software or external:
            err = None
        lm = self.long_mode
        gsize = 16 if lm else 8
        if vec * gsize + gsize - 1 > self.idt.limit:
            raise GuestFault(GP, vec * 8 + 2)
        lo = self.sys_rd(self.idt.base + vec * gsize, 8)
        hi = self.sys_rd(self.idt.base + vec * gsize + 8, 8) if lm else 0
        gtype = (lo >> 40) & 0x1F
        dpl = (lo >> 45) & 3
        if not (lo >> 47) & 1:
            raise GuestFault(NP, vec * 8 + 2)
        if gtype & 0x7 not in (6, 7) or (lm and gtype & 8 == 0):
            raise GuestFault(GP, vec * 8 + 2)
        if software and dpl < self.cpl:
            raise GuestFault(GP, vec * 8 + 2)
        gate32 = bool(gtype & 8)
        sel = (lo >> 16) & 0xFFFF
        off = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000) | ((hi & 0xFFFFFFFF) << 32)
        d, _ = self.read_descriptor(sel)
        cs = self.segment_from(sel, d)
        if not cs.s or not cs.type & 8:
            raise GuestFault(GP, sel & 0xFFFC)
        new_cpl = self.cpl if cs.type & 4 else cs.dpl
        old_ss, old_sp, old_cs = self.seg[SS_].selector, self.R[4], self.seg[CS].selector
        ist = (lo >> 32) & 7 if lm else 0
        if lm:
            if new_cpl < self.cpl or ist:
                tss = self.tr.base
                sp = self.sys_rd(tss + 0x24 + 8 * (ist - 1), 8) if ist else self.sys_rd(tss + 4 + 8 * new_cpl, 8)
                if new_cpl < self.cpl:
                    self.seg[SS_] = Segment(selector=new_cpl, unusable=1, present=0)
                    self.sb[SS_] = 0
            else:
                sp = self.R[4]
            sp &= ~0xF
            self.cpl = new_cpl
            cs.selector = (sel & ~3) | new_cpl
            self.seg[CS], self.sb[CS] = cs, cs.base
            self.update_mode()
            for v in (old_ss, old_sp, old_flags, old_cs, ret) + ((err,) if err is not None else ()):
                sp = (sp - 8) & M64
                self.wr(sp, 8, v)
            self.R[4] = sp
        else:
            size = 4 if gate32 else 2
            if new_cpl < self.cpl:
                tss = self.tr.base
                if self.tr.type & 8:
                    nsp = self.sys_rd(tss + 4 + 8 * new_cpl, 4)
                    nss = self.sys_rd(tss + 8 + 8 * new_cpl, 2)
                else:
                    nsp = self.sys_rd(tss + 2 + 4 * new_cpl, 2)
                    nss = self.sys_rd(tss + 4 + 4 * new_cpl, 2)
                self.cpl = new_cpl
                self.load_seg(SS_, nss)
                self.shadow_int = self.ss_shadow = False     # a stack switch is not a mov ss
                self.R[4] = nsp
                push_stack = True
            else:
                push_stack = False
            cs.selector = (sel & ~3) | new_cpl
            self.seg[CS], self.sb[CS] = cs, cs.base
            self.cpl = new_cpl
            self.update_mode()
            vals = ((old_ss, old_sp) if push_stack else ()) + (old_flags, old_cs, ret)
            vals += (err,) if err is not None else ()
            for v in vals:
                self.push(v, size)
        self.rip = off
        self.rf &= ~(F.TF | F.NT | F.RF | F.VM)
        if not gtype & 1:
            self.rf &= ~F.IF

    def iret(self, size: int) -> None:
        """iret/iretd/iretq. Raises GuestFault(#GP) on a bad frame."""
        if not self.protected:
            ip = self.pop(size)
            cs = self.pop(size)
            fl = self.pop(size)
            self.load_cs(cs)
            self.rip = ip
            mask = 0xFFFF if size == 2 else 0x257FD5
            was_if = self.rf & F.IF
            self.set_rflags((self.rflags & ~mask) | (fl & mask))
            if self.rf & F.IF and not was_if:
                self.irq_window()
            return
        lm64 = self.mode[0] == 64
        ip = self.pop(size)
        cs = self.pop(size) & 0xFFFF
        fl = self.pop(size)
        rpl = cs & 3
        if rpl < self.cpl:
            raise GuestFault(GP, cs & 0xFFFC)
        if lm64 or rpl > self.cpl:
            sp = self.pop(size)
            ss = self.pop(size) & 0xFFFF
        else:
            sp = ss = None
        old_cpl = self.cpl
        was_if = self.rf & F.IF
        self._popf_value(fl, size, old_cpl)
        if self.rf & F.IF and not was_if:
            self.irq_window()
        self.load_cs(cs)
        self.rip = ip if size != 2 else ip & 0xFFFF
        self.rf_rip = self.rip if self.rf & F.RF else -1
        self.rf &= ~F.RF
        if self.rf & F.TF:
            self.pending = True         # single-step from the next instruction on (smp.py)
        if ss is not None:
            if lm64 and ss & 0xFFFC == 0 and rpl < 3:
                self.seg[SS_] = Segment(selector=ss, unusable=1, present=0)
                self.sb[SS_] = 0
                self.update_mode()
            else:
                self.load_seg(SS_, ss)
                self.shadow_int = self.ss_shadow = False     # only mov/pop ss hold off interrupts, not iret
            self.R[4] = sp
        if self.cpl > old_cpl:
            for i in (ES, DS, FS, GS):
                s = self.seg[i]
                if not (s.type & 8 and s.type & 4) and s.dpl < self.cpl:
                    self.seg[i] = Segment(selector=0, unusable=1, present=0)
                    if self.mode[0] != 64 or i in (ES, DS):
                        self.sb[i] = 0

    def _popf_value(self, v: int, size: int, cpl: int) -> None:
        mask = 0x257FD5 if size >= 4 else 0x7FD5
        if self.protected:
            iopl = (self.rf >> 12) & 3
            if cpl > 0:
                mask &= ~F.IOPL
            if cpl > iopl:
                mask &= ~F.IF
        if size >= 4:
            mask &= ~(F.VM | F.VIF | F.VIP)
        cur = self.rflags
        self.set_rflags((cur & ~mask) | (v & mask))

    def irq_window(self) -> bool:
        """IF just went to 1 (STI, POPF, IRET, SYSRET): when an interrupt
        waits, ask the dispatcher in (pending), so it is taken at the next
        instruction boundary, not at the end of the slice.  Returns pending."""
        intc = self.intc
        if intc is None:
            return self.pending
        # The common case, nothing requested anywhere, without the calls:
        # an empty IRR and no 8259 output mean intc.pending() is False.
        if not self.lapic.irr and not intc.pic.intr_out:
            return self.pending
        if intc.pending(self.index):
            self.pending = True
        return self.pending

    def popf(self, v: int, size: int) -> None:
        was_if = self.rf & F.IF
        self._popf_value(v, size, self.cpl)
        if self.rf & F.IF and not was_if:
            self.irq_window()
        self.rf &= ~F.RF                # POPF clears RF (SDM POPF); only IRET loads it
        if self.rf & F.TF:
            self.pending = True         # single-step from the next instruction on (smp.py)

    def pushf_value(self) -> int:
        return self.rflags & ~(F.VM | F.RF)
