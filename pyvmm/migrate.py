"""Moving a machine's vCPUs from one engine to another (hw <-> bt).

`switch_engine(machine, "bt")` is called after the current engine's run()
has returned (a stop request, e.g. from a device the guest pokes at a
checkpoint): it saves every vCPU's CpuState (GPRs, segments, descriptor
tables, control registers, EFER, the MSRs both engines keep, and x87/SSE
as an FXSAVE image), closes the old engine, builds the other one on the
same Machine (same GuestMemory, buses and devices), loads the states, and
clears the stop request so run() can be called again.

Interrupt controller rule (the simplest correct one): a machine moves only
when no interrupt can be in flight, i.e. it has no in-kernel irqchip
(config.irqchip False: KVM exits on HLT and no interrupts are injected) and
its vCPUs run with interrupts masked, so there is no PIC/PIT/APIC state
to carry between KVM's in-kernel model and pyvmm's Python one.  A machine
with the in-kernel irqchip is refused (MigrationError) rather than moved
with its timer and interrupt state lost.  Pending exception/interrupt
events are not carried either: the states are taken between instructions
at a stop request, where KVM has none queued for a guest with IF=0.
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

    Raises MigrationError for an unknown target, a machine with an in-kernel
    irqchip, or one whose engine is running or missing; EngineError when the
    new engine cannot be prepared."""
    if target not in ENGINES:
        raise MigrationError(f"cannot move to engine {target!r} (choose from {', '.join(ENGINES)})")
    old = machine.engine
    if old is None:
        raise MigrationError("the machine has no engine to move from")
    if machine.config.irqchip and (old.name == "hw" or target == "hw"):
        raise MigrationError("moving vCPUs to or from KVM's in-kernel irqchip is not supported "
                             "(build the machine with irqchip=False)")
    states = save_all(old, machine.config.cpus)
    if old.name == target:
        machine.clear_stop()
        return old
    old.close()
    machine.engine = None
    machine.config = dataclasses.replace(machine.config, engine=target)
    from .builder import create_engine
    new = create_engine(machine)
    new.prepare()
    for i, st in enumerate(states):
        new.load_state(i, st)
    machine.engine = new
    machine.clear_stop()
    log.info("moved %d vCPU(s) from %s to %s at rip=%#x", len(states), old.name, target, states[0].rip)
    return new
