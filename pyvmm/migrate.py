"""Moving a machine's vCPUs from one engine to another (hw <-> bt).

`switch_engine(machine, "bt")` is called after the current engine's run()
has returned (a stop request, e.g. from a device the guest pokes at a
checkpoint): it saves every vCPU's CpuState (GPRs, segments, descriptor
tables, control registers, EFER, the MSRs both engines keep, and x87/SSE
as an FXSAVE image), closes the old engine, builds the other one on the
same Machine (same GuestMemory, buses and devices), loads the states, and
clears the stop request so run() can be called again.

Interrupt state: a machine with KVM's in-kernel irqchip carries its PIC
pair, IOAPIC, PIT, local APICs and guest time across the move, translated
between KVM's structures and bt's Python models (engines/kvm/
platform_state.py's to_models/from_models, platform_convert.py), with
each vCPU's TSC, APIC base, TSC deadline, kvmclock/PV MSRs, run state and
pending events: an interrupt or exception KVM had queued for delivery is
delivered by bt before its first instruction, a pending NMI stays
pending, a halted vCPU stays halted and an AP waiting for its SIPI keeps
waiting.  Timers move as the time they have left.  Without the irqchip
(config.irqchip False) hw has no interrupt state to carry and the vCPUs
move alone.  The hybrid engine is not a target yet.
"""

from __future__ import annotations

import dataclasses
import logging

from .cpu import CpuState
from .engines.base import Engine
from .errors import EngineError
from .machine import Machine

log = logging.getLogger(__name__)

ENGINES = ("hw", "bt")


class MigrationError(EngineError):
    """The machine cannot move to the other engine (what is missing is said)."""


def save_all(engine: Engine, cpus: int) -> list[CpuState]:
    """Every vCPU's state, vCPU 0 first (the engine must not be running)."""
    return [engine.save_state(i) for i in range(cpus)]


def switch_engine(machine: Machine, target: str) -> Engine:
    """Replaces machine.engine with a `target` engine carrying the same vCPU
    states; returns the new engine, ready for run().

    Raises MigrationError for an unknown target or a machine whose engine
    is running or missing; EngineError when the new engine cannot be
    prepared or KVM refuses the interrupt state."""
    if target not in ENGINES:
        raise MigrationError(f"cannot move to engine {target!r} (choose from {', '.join(ENGINES)})")
    old = machine.engine
    if old is None:
        raise MigrationError("the machine has no engine to move from")
    states = save_all(old, machine.config.cpus)
    if old.name == target:
        machine.clear_stop()
        return old
    carry = bool(machine.config.irqchip)     # hw has interrupt state of its own only with the irqchip
    moved = _take_platform(machine, old) if carry else None
    old.close()
    machine.devices.pop("kvm_platform", None)
    machine.engine = None
    machine.config = dataclasses.replace(machine.config, engine=target)
    from .builder import create_engine
    new = create_engine(machine)
    new.prepare()
    kvm_platform = None
    if new.name == "hw" and new.irqchip:
        from .engines.kvm.platform_state import KvmPlatformState
        kvm_platform = machine.devices["kvm_platform"] = KvmPlatformState(new)   # power-on state first
    for i, st in enumerate(states):
        new.load_state(i, st)
    if moved is not None:
        try:
            if kvm_platform is not None:
                kvm_platform.from_models(moved)
            elif new.name == "bt":
                _give_bt(new, moved)
        except OSError as e:
            raise EngineError(f"KVM refused the interrupt state: {e.strerror}") from None
    machine.engine = new
    machine.clear_stop()
    log.info("moved %d vCPU(s) from %s to %s at rip=%#x", len(states), old.name, target, states[0].rip)
    return new


def _take_platform(machine: Machine, engine: Engine) -> dict | None:
    """The interrupt platform of a stopped engine in the Python models'
    terms (see KvmPlatformState.to_models), or None if it has none."""
    intc = machine.devices.get("intc")
    if engine.name == "hw":
        if not getattr(engine, "irqchip", False):
            return None
        from .engines.kvm.platform_state import KvmPlatformState
        platform = machine.devices.get("kvm_platform")
        if not isinstance(platform, KvmPlatformState) or platform.vm is not engine.vm:
            platform = KvmPlatformState(engine)
        try:
            return platform.to_models(intc.save() if intc is not None else None)
        except OSError as e:
            raise EngineError(f"KVM will not give its interrupt state: {e.strerror}") from None
    if engine.name == "bt":
        return _take_bt(engine)
    return None


def _take_bt(engine) -> dict:
    """A stopped bt engine's platform in the shape of KvmPlatformState.to_models()."""
    from .engines.bt.faults import GuestFault
    from .engines.bt.system import rdmsr, tsc
    from .engines.kvm.platform_state import MOVE_MSRS
    cpus = []
    for i, c in enumerate(engine.cpus):
        msrs = {}
        for index in MOVE_MSRS:
            try:
                msrs[index] = rdmsr(c, index)
            except GuestFault:
                pass
        cpus.append({"tsc": tsc(c), "msrs": msrs, "halted": c.halted,
                     "waiting_sipi": engine.sched.waiting_sipi[i],
                     "events": {"exception": None, "error_code": None, "interrupt": None, "soft": False,
                                "shadow": c.shadow_int, "nmi": engine.intc.nmi[i], "nmi_masked": False}})
    return {"now_ns": engine.clock.now_ns(), "intc": engine.intc.save(), "cpus": cpus}


def _give_bt(engine, moved: dict) -> None:
    """Loads a platform taken from hw into a prepared bt engine whose vCPU
    states are loaded: guest time, the devices, then per vCPU the TSC,
    MSRs and what KVM had pending."""
    from .engines.bt.faults import GuestFault
    from .engines.bt.system import wrmsr
    from .engines.kvm.platform_state import MSR_TSC_ADJUST
    clock, intc = engine.clock, engine.intc
    clock.restore({**clock.save(), "now_ns": moved["now_ns"]})
    intc.restore(moved["intc"])
    for c, cpu in zip(engine.cpus, moved["cpus"]):
        engine.sched.waiting_sipi[c.index] = cpu["waiting_sipi"]
        c.tsc_offset = cpu["tsc"] - clock.tsc()
        for index, value in cpu["msrs"].items():
            if index == MSR_TSC_ADJUST:
                c.msrs[index] = value            # a write would move the TSC again
                continue
            try:
                wrmsr(c, index, value)
            except GuestFault:
                log.debug("bt vCPU %d: MSR %#x not carried", c.index, index)
        events = cpu["events"]
        c.shadow_int = events["shadow"]
        if events["exception"] is not None:
            c.deliver(GuestFault(events["exception"], events["error_code"]))
        elif events["interrupt"] is not None and not events["soft"]:
            c.interrupts += 1                    # acknowledged by KVM already: deliver it as is
            c.deliver(GuestFault(events["interrupt"]), external=True)
        elif events["interrupt"] is not None:
            log.warning("bt vCPU %d: a software interrupt KVM was re-injecting is not carried", c.index)
        elif cpu["halted"]:
            c.halted = True
