"""The hw side of pyvmm's paravirtual interface.

KVM runs `vmcall` itself, so under hw the hypercall page ends in an `out`
to the doorbell port (devices/pv_doorbell.py); the doorbell calls
`doorbell` here in the vCPU's thread, which hands the dispatcher a
KvmVcpuPort over that vCPU's registers.  The hypercall-page MSR reaches
pyvmm through KVM's user-space MSR exits (KVM_CAP_X86_USER_SPACE_MSR for
MSRs KVM does not know): `msr_exit` answers ours and gives #GP for any
other, as KVM would have."""

from __future__ import annotations

import logging
import struct

from ...errors import EngineError
from . import abi

log = logging.getLogger(__name__)

CAP_X86_USER_SPACE_MSR = 188
MSR_EXIT_REASON_UNKNOWN = 1 << 1
EXIT_X86_RDMSR = 29
EXIT_X86_WRMSR = 30
MP_STATE_HALTED = 3
# struct kvm_run's msr exit: u8 error, u8 pad[7], u32 reason, u32 index, u64 data
MSR_EXIT = struct.Struct("<B7xIIQ")


class KvmVcpuPort:
    """The paravirt.hypervisor.VcpuPort of a KVM vCPU (registers read once per call)."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.index = vcpu.index
        self.regs = vcpu.get_regs()
        self._sregs = None

    def sregs(self):
        if self._sregs is None:
            self._sregs = self.vcpu.get_sregs()
        return self._sregs

    def reg(self, name: str) -> int:
        return getattr(self.regs, name)

    def set_result(self, value: int) -> None:
        self.regs.rax = value
        self.vcpu.set_regs(self.regs)

    def cpl(self) -> int:
        return self.sregs().ss.dpl

    def set_cr3(self, value: int) -> None:
        s = self.sregs()
        s.cr3 = value
        self.vcpu.set_sregs(s)

    def flush_tlb(self, la: int | None) -> None:
        self.vcpu.set_sregs(self.sregs())   # KVM resets its MMU context on KVM_SET_SREGS

    def tables_written(self, gpas: list[int]) -> None:
        self.flush_tlb(None)

    def halt(self) -> None:
        self.regs.rflags |= 0x200   # sti; hlt in one step: no lost wake-up (regs written by set_result)
        self.vcpu.set_mp_state(MP_STATE_HALTED)


def doorbell(engine, hv) -> None:
    """Runs the hypercall of the vCPU whose thread rang the doorbell.
    Raises EngineError when called outside a vCPU thread."""
    vcpu = getattr(engine.current, "vcpu", None)
    if vcpu is None:
        raise EngineError("paravirt doorbell rung outside a vCPU thread")
    hv.dispatch(KvmVcpuPort(vcpu))


def enable_msr_exits(engine) -> None:
    """Asks KVM to exit for MSRs it does not know. Raises EngineError."""
    cap = abi.EnableCap()
    cap.cap = CAP_X86_USER_SPACE_MSR
    cap.args[0] = MSR_EXIT_REASON_UNKNOWN
    from .device import ioctl
    try:
        ioctl(engine.vm.fd, abi.ENABLE_CAP, cap)
    except OSError as e:
        raise EngineError(f"KVM user-space MSR exits: {e.strerror}") from None


def msr_exit(hv, msr_index: int, vcpu, write: bool) -> None:
    """Completes a KVM_EXIT_X86_RDMSR/WRMSR: ours is answered, others #GP."""
    mm = vcpu.run_mm
    _, reason, idx, data = MSR_EXIT.unpack_from(mm, abi.RUN_UNION)
    error = 1
    if idx == msr_index:
        if write:
            error = 0 if hv.write_msr(vcpu.index, data) else 1
        else:
            data, error = hv.read_msr(vcpu.index), 0
    else:
        log.debug("vcpu%d: %s of unknown MSR %#x: #GP", vcpu.index, "wrmsr" if write else "rdmsr", idx)
    MSR_EXIT.pack_into(mm, abi.RUN_UNION, error, reason, idx, data)


def add_cpuid(engine, leaves: dict[int, tuple[int, int, int, int]]) -> None:
    """Adds leaves to every vCPU's CPUID table (before the first KVM_RUN)."""
    from . import cpuid
    cfg = engine.machine.config
    hidden = cpuid.expand_hidden(cfg.cpuid_hide)
    supported = engine.kvm.supported_cpuid()
    for v in engine.vcpus:
        entries = [e for e in cpuid.guest_cpuid(supported, v.index, cfg.cpus, hidden)
                   if e.function not in leaves]
        for fn, (a, b, c, d) in sorted(leaves.items()):
            e = abi.CpuidEntry2()
            e.function, e.eax, e.ebx, e.ecx, e.edx = fn, a, b, c, d
            entries.append(e)
        v.set_cpuid(entries)
