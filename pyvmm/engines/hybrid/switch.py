"""Handing a bt vCPU's user-mode state to a KVM vCPU and taking it back.

The hybrid engine runs guest user code (CPL3) under KVM and everything
else in the translator.  While user code runs under KVM, no guest event may
be handled by KVM or by the guest's kernel there: the kernel's half of every
event runs in bt.  So the KVM copy of the vCPU differs from the guest's
architectural state in three places, all invisible to CPL3 code:

- IDTR limit 0: any exception or software interrupt in user mode becomes a
  triple fault (#GP on the IDT read, then #DF, then shutdown), which exits
  to pyvmm with RIP still at the faulting instruction; bt then executes that
  instruction again and delivers the real event through the guest's IDT;
- LSTAR and CSTAR = SYSCALL_SENTINEL, an address no guest maps: `syscall`
  lands there and the fetch faults (on kvm_pvm, which does not switch to
  CPL0 on a user `syscall`, RIP also ends up there), so an exit at that RIP
  means "the guest made a system call", with RCX and R11 set by the CPU;
- SYSENTER_CS = 0: `sysenter` is #GP and so a triple fault, re-run in bt;
- MISC_FEATURES_ENABLES.CPUID_FAULT = 1: `cpuid` at CPL3 is #GP, so user
  code reads the same virtual CPU (bt's CPUID table: vendor, family,
  features, brand) as the kernel does, not the host's.  Measured: kvm_pvm
  on an AMD EPYC honours it (and reports the capability in
  MSR_PLATFORM_INFO bit 31); KVM emulates it on VT-x and AMD-V hosts too.
  Where KVM refuses it, user code would see the host's CPUID: the engine
  says so once (cpuid_faulting is False);
- CR4.TSD = 1: `rdtsc`/`rdtscp` at CPL3 are #GP, so user code reads bt's
  TSC (the guest clock every bt device and kvmclock agree with) through
  bt.  Measured: kvm_pvm ignores TSD for user code, which there reads the
  host's raw TSC (no offset, no scaling), so a Linux guest must not give
  user space a TSC-based clock (engine.py adds tsc=unstable).

Only what user code can change comes back: GPRs, RIP, RFLAGS, the data
segment registers (selectors and FS/GS bases) and the FPU/SSE state.

Everything here raises EngineError when KVM refuses a state."""

from __future__ import annotations

import ctypes
import struct

from ...errors import EngineError
from ..bt.cpu import SEG_NAMES
from ..bt.fxstate import from_fxsave, to_fxsave
from ..kvm import abi
from ..kvm.device import ioctl
from ..kvm.state import (FXSAVE_HEADER, MXCSR_MASK, XCR0_RESET, _from_kvm_segment, _to_kvm_segment, put_ymmh,
                         set_xcr0, ymmh_from_xsave)

SYSCALL_SENTINEL = 0xFFFFFFFFFFFFF000   # the top page: unmapped in Linux and in pyvmm's test guests
MSR_SYSENTER_CS = 0x174
CR4_TSD = 1 << 2
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_MISC_FEATURES_ENABLES, CPUID_FAULT = 0x140, 1
DR6_BS, DR6_INIT = 1 << 14, 0xFFFF0FF0
GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")   # bt's R[] order
CS_INDEX = SEG_NAMES.index("cs")


class UserSwitch:
    """Moves one vCPU's user-mode state between a BtCpu and a KvmVcpu."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.sregs = vcpu.get_sregs()      # keeps KVM's apic_base and interrupt bitmap
        self.regs = abi.Regs()
        self._xsave = bytearray(abi.XSAVE_AREA_SIZE)
        self._xsave_buf = (ctypes.c_uint8 * abi.XSAVE_AREA_SIZE).from_buffer(self._xsave)
        ioctl(vcpu.fd, abi.GET_XSAVE, self._xsave_buf)
        # What KVM holds now, to skip the ioctls that would change nothing
        # (KVM_SET_SREGS alone costs ~60 us here: it resets KVM's MMU context).
        self._kvm_sregs = bytes(self.sregs)
        self._kvm_fpu: bytes | None = None
        self._kvm_ymmh: list[int] | None = None
        self._kvm_xcr0 = XCR0_RESET
        self._kvm_msrs: tuple | None = None
        self.skipped = 0
        self.cpuid_faulting = vcpu.set_msrs({MSR_MISC_FEATURES_ENABLES: CPUID_FAULT}) == 1

    # -- bt -> KVM ----------------------------------------------------------------
    def to_kvm(self, c) -> None:
        """Loads bt vCPU c (at CPL3) into KVM, with the event traps above."""
        s = self.sregs
        for i, name in enumerate(SEG_NAMES):
            seg = c.seg[i]
            k = _to_kvm_segment(seg)
            k.base = c.sb[i]
            setattr(s, name, k)
        s.tr, s.ldt = _to_kvm_segment(c.tr), _to_kvm_segment(c.ldt)
        s.gdt.base, s.gdt.limit = c.gdt.base, c.gdt.limit
        s.idt.base, s.idt.limit = 0, 0
        # CR2 stays KVM's: CPL3 cannot read it, and a trap at the syscall
        # sentinel leaves KVM's different from bt's on every system call.
        s.cr0, s.cr3, s.cr4, s.cr8, s.efer = c.cr0, c.cr3, c.cr4 | CR4_TSD, c.cr8, c.efer
        raw = bytes(s)
        if raw != self._kvm_sregs:
            try:
                self.vcpu.set_sregs(s)
            except OSError as e:
                raise EngineError(f"hybrid: KVM refused the guest's system state (CR0={c.cr0:#x} "
                                  f"CR4={c.cr4:#x} EFER={c.efer:#x}): {e.strerror}") from None
            self._kvm_sregs = raw
        else:
            self.skipped += 1
        r = self.regs
        for name, v in zip(GPR_ORDER, c.R):
            setattr(r, name, v)
        r.rip, r.rflags = c.rip, c.rflags
        self.vcpu.set_regs(r)
        msrs = c.msrs
        fixed = (msrs.get(MSR_STAR, 0), msrs.get(MSR_FMASK, 0))
        if fixed != self._kvm_msrs:
            self.vcpu.set_msrs({MSR_STAR: fixed[0], MSR_FMASK: fixed[1], MSR_LSTAR: SYSCALL_SENTINEL,
                                MSR_CSTAR: SYSCALL_SENTINEL, MSR_SYSENTER_CS: 0})
            self._kvm_msrs = fixed
        if c.xcr0 != self._kvm_xcr0:
            # The kernel's XSETBV (under bt) reaches the CPU that runs user code.
            try:
                set_xcr0(self.vcpu, c.xcr0)
            except OSError as e:
                raise EngineError(f"hybrid: KVM refused the guest's XCR0 {c.xcr0:#x}: {e.strerror}") from None
            self._kvm_xcr0 = c.xcr0
        image = to_fxsave(c)
        if image != self._kvm_fpu or c.ymmh != self._kvm_ymmh:
            self._put_fpu(image, c.ymmh if c.xcr0 & 4 else None)
            self._kvm_fpu = image
            self._kvm_ymmh = list(c.ymmh)

    def _put_fpu(self, image: bytes, ymmh: list[int] | None) -> None:
        # KVM_SET_XSAVE with x87+SSE (and AVX) marked in use: on kvm_pvm
        # KVM_SET_FPU alone leaves the XSAVE header calling SSE initial (kvm/state.py).
        buf = self._xsave
        buf[0:416] = image[0:416]
        xstate_bv = struct.unpack_from("<Q", buf, 512)[0] | 3
        struct.pack_into("<Q", buf, 512, xstate_bv)
        if ymmh is not None:
            put_ymmh(buf, ymmh)
        ioctl(self.vcpu.fd, abi.SET_XSAVE, self._xsave_buf)

    # -- KVM -> bt ----------------------------------------------------------------
    def regs_after_run(self) -> abi.Regs:
        """The GPRs KVM left (also read by the engine to classify the exit)."""
        ioctl(self.vcpu.fd, abi.GET_REGS, self.regs)
        return self.regs

    def took_single_step(self) -> bool:
        """Whether the exit was the single-step #DB (RFLAGS.TF) after the
        instruction before RIP: KVM's DR6.BS, which is then cleared again
        (DR6 is sticky; CPL3 cannot read it).  Measured on kvm_pvm: BS set,
        RIP after the instruction, RF clear, as for int3."""
        d = abi.DebugRegs()
        ioctl(self.vcpu.fd, abi.GET_DEBUGREGS, d)
        if not d.dr6 & DR6_BS:
            return False
        d.dr6 = DR6_INIT
        ioctl(self.vcpu.fd, abi.SET_DEBUGREGS, d)
        return True

    def to_bt(self, c) -> None:
        """Copies what user code can change back into bt vCPU c (call
        regs_after_run first)."""
        r = self.regs
        c.R = [getattr(r, name) for name in GPR_ORDER]
        c.rip = r.rip
        c.set_rflags(r.rflags)
        s = self.sregs
        ioctl(self.vcpu.fd, abi.GET_SREGS, s)
        self._kvm_sregs = bytes(s)
        changed = False
        for i, name in enumerate(SEG_NAMES):
            seg = _from_kvm_segment(getattr(s, name))
            if seg != c.seg[i] or seg.base != c.sb[i]:
                changed = changed or i == CS_INDEX
                c.seg[i] = seg
                c.sb[i] = seg.base
        ioctl(self.vcpu.fd, abi.GET_XSAVE, self._xsave_buf)
        image = bytearray(512)
        image[0:416] = self._xsave[0:416]
        if not struct.unpack_from("<Q", self._xsave, 512)[0] & 2:
            # SSE state initial in the XSAVE header: XMM registers are zero
            # (MXCSR is kept in the legacy area either way).
            image[160:416] = bytes(256)
        if not struct.unpack_from("<Q", self._xsave, 512)[0] & 1:
            FXSAVE_HEADER.pack_into(image, 0, 0x37F, 0, 0, 0, 0, 0,
                                    struct.unpack_from("<I", self._xsave, 24)[0], MXCSR_MASK)
            image[32:160] = bytes(128)
        image = bytes(image)
        from_fxsave(c, image)
        self._kvm_fpu = image if to_fxsave(c) == image else None
        if c.xcr0 & 4:
            c.ymmh = ymmh_from_xsave(self._xsave)
            self._kvm_ymmh = list(c.ymmh)
        if changed:
            c.update_mode()
