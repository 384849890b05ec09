"""Converting between pyvmm's CpuState and KVM's register structures."""

from __future__ import annotations

from ...cpu import GPR_NAMES, CpuState, DescriptorTable, Segment
from . import abi
from .device import KvmVcpu

_SEG_ATTRS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")

# MSRs a vCPU's state includes (Linux's syscall setup, TSC, PAT, MTRR default).
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_MISC_ENABLE = 0x1A0
MSR_PAT = 0x277
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE = 0xC0000100, 0xC0000101, 0xC0000102
MSR_TSC = 0x10
STATE_MSRS = (MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP, MSR_PAT, MSR_STAR, MSR_LSTAR,
              MSR_CSTAR, MSR_FMASK, MSR_KERNEL_GS_BASE, MSR_MISC_ENABLE, MSR_MTRR_DEF_TYPE)
# What a freshly reset PC has: fast strings on, MTRRs enabled with write-back default.
BOOT_MSRS = {MSR_MISC_ENABLE: 1, MSR_MTRR_DEF_TYPE: (1 << 11) | 6}


def _to_kvm_segment(seg: Segment) -> abi.Segment:
    return abi.Segment(**{a: getattr(seg, a) for a in _SEG_ATTRS})


def _from_kvm_segment(k: abi.Segment) -> Segment:
    return Segment(**{a: getattr(k, a) for a in _SEG_ATTRS})


def load(vcpu: KvmVcpu, st: CpuState, boot_msrs: bool = True) -> None:
    """Writes the whole CpuState into a KVM vCPU (with the reset values of
    MSRs a fresh PC has, unless boot_msrs is False)."""
    sregs = vcpu.get_sregs()  # keeps apic_base and the interrupt bitmap
    for name in CpuState.SEGMENT_NAMES:
        setattr(sregs, name, _to_kvm_segment(getattr(st, name)))
    sregs.gdt.base, sregs.gdt.limit = st.gdt.base, st.gdt.limit
    sregs.idt.base, sregs.idt.limit = st.idt.base, st.idt.limit
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer = (
        st.cr0, st.cr2, st.cr3, st.cr4, st.cr8, st.efer)
    vcpu.set_sregs(sregs)
    regs = abi.Regs()
    for name in GPR_NAMES:
        setattr(regs, name, st.regs.get(name, 0))
    regs.rip, regs.rflags = st.rip, st.rflags
    vcpu.set_regs(regs)
    msrs = dict(BOOT_MSRS) if boot_msrs else {}
    msrs.update(st.msrs)
    if msrs:
        vcpu.set_msrs(msrs)


def save(vcpu: KvmVcpu) -> CpuState:
    """Reads a KVM vCPU's registers back into a CpuState."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    st = CpuState()
    st.regs = {name: getattr(regs, name) for name in GPR_NAMES}
    st.rip, st.rflags = regs.rip, regs.rflags
    for name in CpuState.SEGMENT_NAMES:
        setattr(st, name, _from_kvm_segment(getattr(sregs, name)))
    st.gdt = DescriptorTable(sregs.gdt.base, sregs.gdt.limit)
    st.idt = DescriptorTable(sregs.idt.base, sregs.idt.limit)
    st.cr0, st.cr2, st.cr3, st.cr4, st.cr8, st.efer = (
        sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer)
    st.msrs = vcpu.get_msrs(list(STATE_MSRS))
    return st


def describe(st: CpuState) -> str:
    """A register dump for crash reports."""
    r = st.regs
    lines = [
        f"RIP={st.rip:016x} RFLAGS={st.rflags:08x} CS={st.cs.selector:04x} SS={st.ss.selector:04x}"
        f" CPL={st.cs.dpl} {'long' if st.long_mode else 'legacy'}",
        " ".join(f"{n.upper()}={r[n]:016x}" for n in GPR_NAMES[:4]),
        " ".join(f"{n.upper()}={r[n]:016x}" for n in GPR_NAMES[4:8]),
        " ".join(f"{n.upper():>3}={r[n]:016x}" for n in GPR_NAMES[8:12]),
        " ".join(f"{n.upper():>3}={r[n]:016x}" for n in GPR_NAMES[12:]),
        f"CR0={st.cr0:08x} CR2={st.cr2:016x} CR3={st.cr3:016x} CR4={st.cr4:08x} EFER={st.efer:x}",
    ]
    return "\n".join(lines)
