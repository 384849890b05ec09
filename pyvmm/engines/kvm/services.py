"""What the hw engine offers the installers of guest interfaces
(paravirt/install.py, devices/vmware_install.py); KvmEngine's methods of the
same names (engines/base.py) call these."""

from __future__ import annotations

import fcntl
from typing import Callable

from ...errors import EngineError
from ..callerregs import CallerRegs
from . import pvexit

KVM_GET_TSC_KHZ = 0xAEA3      # _IO(KVMIO, 0xa3)
KVM_APIC_BUS_HZ = 1_000_000_000  # KVM's in-kernel local APIC: one bus cycle per ns


def add_cpuid_leaves(eng, leaves: dict[int, tuple[int, int, int, int]]) -> None:
    """KVM takes a whole CPUID table per vCPU: the leaves added so far are
    kept on the engine and set again with these in front."""
    extra = eng.__dict__.setdefault("cpuid_extra", {})
    extra.update(leaves)
    pvexit.add_cpuid(eng, extra)


def cpuid_leaf(eng, leaf: int) -> tuple[int, int, int, int]:
    """What vCPU 0's table answers for `leaf` (subleaf 0), added leaves included."""
    extra = getattr(eng, "cpuid_extra", {})
    if leaf in extra:
        return extra[leaf]
    from . import cpuid
    cfg = eng.machine.config
    for e in cpuid.guest_cpuid(eng.kvm.supported_cpuid(), 0, cfg.cpus, cpuid.expand_hidden(cfg.cpuid_hide)):
        if e.function == leaf and e.index == 0:
            return e.eax, e.ebx, e.ecx, e.edx
    return 0, 0, 0, 0


def clock_hz(eng) -> tuple[int, int]:
    """The guest TSC rate KVM gives vCPU 0 (0 when KVM will not say) and
    the in-kernel APIC's bus rate."""
    try:
        khz = fcntl.ioctl(eng.vcpus[0].fd, KVM_GET_TSC_KHZ)
    except (OSError, IndexError, AttributeError):
        khz = 0
    return max(khz, 0) * 1000, KVM_APIC_BUS_HZ


def attach_hypercalls(eng, hv, msr: int) -> None:
    """The hypercall-page MSR as KVM user-space MSR exits, and the doorbell
    port the hypercall page rings. Raises EngineError when KVM cannot give
    the MSR exits, BusError when the port is taken."""
    from ...devices.pv_doorbell import PvDoorbell
    from ...paravirt import abi
    pvexit.enable_msr_exits(eng)
    eng.exit_hooks[pvexit.EXIT_X86_RDMSR] = lambda v: pvexit.msr_exit(hv, msr, v, False)
    eng.exit_hooks[pvexit.EXIT_X86_WRMSR] = lambda v: pvexit.msr_exit(hv, msr, v, True)
    bell = PvDoorbell(lambda: pvexit.doorbell(eng, hv), abi.VERSION)
    machine = eng.machine
    machine.io_bus.insert(abi.DOORBELL_PORT, abi.DOORBELL_LENGTH, bell, "pv-doorbell")
    machine.devices["pv_doorbell"] = bell


def port_caller(eng) -> Callable[[], CallerRegs]:
    """The port exit runs in the vCPU's thread: engine.current.vcpu is that
    vCPU, whose registers pvexit.KvmVcpuPort reads (written back with
    KVM_SET_REGS before KVM completes the `in`).  Which CPL may reach the
    ports is KVM's business (on kvm_pvm a CPL3 `in` without I/O permission
    is #GP in the guest before pyvmm sees it)."""
    def regs() -> CallerRegs:
        vcpu = getattr(eng.current, "vcpu", None)
        if vcpu is None:
            raise EngineError("port access outside a vCPU thread")
        port = pvexit.KvmVcpuPort(vcpu)
        dirty = []

        def set_(name: str, value: int) -> None:
            setattr(port.regs, name, value)
            dirty.append(name)

        def commit() -> None:
            if dirty:
                vcpu.set_regs(port.regs)   # RIP unchanged: KVM then completes the `in`
        return CallerRegs(port, set_, commit)
    return regs
