"""Wiring pyvmm's paravirtual interface into a built machine.

`attach(machine)` runs after the engine's prepare(): it makes the
Hypervisor and, per engine, adds the CPUID leaves, the hypercall-page MSR
and the path from the hypercall page to the dispatcher:
  bt: c.pv / c.pv_msr on each vCPU (engines/bt/pvcall.py, bt/system.py),
      and a CPUID table wrapper answering pyvmm's leaves;
  hw: CPUID entries, KVM user-space MSR exits, the doorbell port.
With config.paravirt False nothing is added: the guest sees no signature,
vmcall is #UD under bt and the MSR #GPs."""

from __future__ import annotations

import logging

from ..engines.bt.cpuid import CpuidOverlay
from ..machine import EXIT_OK, Machine, StopReason
from . import abi
from .hypervisor import Hypervisor

log = logging.getLogger(__name__)


class PvCpuidTable(CpuidOverlay):
    """A bt CpuidTable with pyvmm's leaves in front (same lookup())."""


def make_hypervisor(machine: Machine) -> Hypervisor:
    """The dispatcher for `machine`, its console the UART's output sink."""
    serial = machine.devices.get("serial0")
    console = serial.output if serial is not None else (lambda data: None)

    def inject(irq: int) -> None:
        eng = machine.engine
        if eng is not None and not machine.stopping:
            with machine.lock:
                eng.set_irq(irq, 1)
                eng.set_irq(irq, 0)

    def stop(kind: int, status: int) -> None:
        if kind == abi.SHUTDOWN_RESET:
            machine.request_stop(StopReason.RESET, EXIT_OK, "paravirt reset")
        elif status == 0:
            machine.request_stop(StopReason.POWEROFF, EXIT_OK, "paravirt poweroff")
        else:
            machine.request_stop(StopReason.DEBUG_EXIT, (status << 1) | 1, f"paravirt shutdown status {status}")

    clock = machine.devices.get("clock")
    clock_ns = clock.now_ns if clock is not None else None
    return Hypervisor(machine.memory, console, inject, stop, clock_ns, machine.config.engine, machine.loop)


def offered_features(engine: str) -> int:
    """The feature bits pyvmm offers under `engine`.  Under hw on a host
    whose KVM shadows the guest's page tables (kvm_pvm, or no VT-x/AMD-V),
    FEAT_MMU is withheld: mmu_update writes the tables from user space, past
    KVM's write protection, and KVM_SET_SREGS does not drop the shadow pages
    built from them, so a changed or recycled table would keep being used
    stale (see docs/paravirt.md).  The operations still answer."""
    if engine == "hw":
        from ..engines.kvm import hostfit
        if hostfit.kernel_mode_emulated():
            return abi.FEATURES & ~(abi.FEAT_MMU | abi.FEAT_UPDATE_VA)
    return abi.FEATURES


def attach(machine: Machine) -> Hypervisor | None:
    """Adds the paravirtual interface to a machine whose engine is prepared
    (None when config.paravirt is off). Raises EngineError (hw) when KVM
    cannot give pyvmm the MSR exits."""
    if not getattr(machine.config, "paravirt", True):
        return None
    hv = make_hypervisor(machine)
    eng = machine.engine
    leaves = abi.cpuid_leaves(features=offered_features(eng.name))
    if eng.name == "bt":
        for c in eng.cpus:
            c.pv = hv
            c.pv_msr = abi.MSR_HYPERCALL_PAGE
            c.cpuid = PvCpuidTable(c.cpuid, leaves)
    elif eng.name == "hw":
        from ..devices.pv_doorbell import PvDoorbell
        from ..engines.kvm import pvexit
        pvexit.add_cpuid(eng, leaves)
        pvexit.enable_msr_exits(eng)
        msr = abi.MSR_HYPERCALL_PAGE
        eng.exit_hooks[pvexit.EXIT_X86_RDMSR] = lambda v: pvexit.msr_exit(hv, msr, v, False)
        eng.exit_hooks[pvexit.EXIT_X86_WRMSR] = lambda v: pvexit.msr_exit(hv, msr, v, True)
        bell = PvDoorbell(lambda: pvexit.doorbell(eng, hv), abi.VERSION)
        machine.io_bus.insert(abi.DOORBELL_PORT, abi.DOORBELL_LENGTH, bell, "pv-doorbell")
        machine.devices["pv_doorbell"] = bell
    else:
        return None
    machine.devices["paravirt"] = hv
    log.debug("paravirt: %r on %s", hv, eng.name)
    return hv
