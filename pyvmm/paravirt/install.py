"""Wiring pyvmm's paravirtual interface into a built machine.

`attach(machine)` runs after the engine's prepare(): it makes the
Hypervisor, asks the engine to route hypercalls to it and adds pyvmm's
CPUID leaves through the engine (engines/base.py: attach_hypercalls,
add_cpuid_leaves).  How each engine does it lives with the engine:
  bt: c.pv / c.pv_msr on each vCPU and a CPUID overlay (engines/bt/services.py);
  hw: KVM user-space MSR exits, the doorbell port, CPUID entries
      (engines/kvm/services.py).
With config.paravirt False, or an engine without a hypercall path, nothing
is added: the guest sees no signature, vmcall is #UD under bt and the MSR #GPs."""

from __future__ import annotations

import logging

from ..machine import Machine, StopReason
from . import abi
from .hypervisor import Hypervisor

log = logging.getLogger(__name__)


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
            machine.request_stop(StopReason.RESET, "paravirt reset")
        elif status == 0:
            machine.request_stop(StopReason.POWEROFF, "paravirt poweroff")
        else:
            machine.request_stop(StopReason.DEBUG_EXIT, f"paravirt shutdown status {status}", value=status)

    clock = machine.devices.get("clock")
    clock_ns = clock.now_ns if clock is not None else None
    return Hypervisor(machine.memory, console, inject, stop, clock_ns, machine.config.engine, machine.loop)


def features_for(shadowed_page_tables: bool) -> int:
    """The feature bits pyvmm offers.  Where the engine's host shadows the
    guest's page tables (KVM on kvm_pvm, or without VT-x/AMD-V), FEAT_MMU is
    withheld: mmu_update writes the tables from user space, past KVM's write
    protection, and KVM_SET_SREGS does not drop the shadow pages built from
    them, so a changed or recycled table would keep being used stale (see
    docs/paravirt.md).  The operations still answer."""
    if shadowed_page_tables:
        return abi.FEATURES & ~(abi.FEAT_MMU | abi.FEAT_UPDATE_VA)
    return abi.FEATURES


def attach(machine: Machine) -> Hypervisor | None:
    """Adds the paravirtual interface to a machine whose engine is prepared
    (None when config.paravirt is off or the engine has no hypercall path).
    Raises EngineError (hw) when KVM cannot give pyvmm the MSR exits."""
    if not getattr(machine.config, "paravirt", True):
        return None
    hv = make_hypervisor(machine)
    eng = machine.engine
    if not eng.attach_hypercalls(hv, abi.MSR_HYPERCALL_PAGE):
        return None
    eng.add_cpuid_leaves(abi.cpuid_leaves(features=features_for(eng.shadows_guest_page_tables())))
    machine.devices["paravirt"] = hv
    log.debug("paravirt: %r on %s", hv, eng.name)
    return hv
