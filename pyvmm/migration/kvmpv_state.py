"""KVM's paravirtual interface (engines/bt/kvmpv.py) across a migration.

A guest that booted under bt found KVM's signature and registered its
kvmclock records, PV-EOI flags and steal-time areas by MSR.  Those
registrations live in the vCPUs' KvmPv objects, which no device save
carries, so they travel here: a bt or hybrid destination gets the same
interface (hybrid's bt half too: the guest's kernel keeps writing those
MSRs, at shutdown for one) with the same addresses, and its local APICs
use the PV-EOI flags again.  A destination of another family ignores it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..engines.bt import kvmpv
from .stream import StreamError

if TYPE_CHECKING:
    from ..machine import Machine


def bt_cpus(machine: "Machine") -> list | None:
    """The BtCpus of a bt or hybrid machine (None under hw)."""
    engine = machine.engine
    if engine.name not in ("bt", "hybrid"):
        return None
    return list(getattr(engine, "bt", engine).cpus)


def save(machine: "Machine") -> list[dict] | None:
    """Each vCPU's features and MSRs, or None where the guest has no KVM interface."""
    cpus = bt_cpus(machine)
    if not cpus or getattr(cpus[0], "kvm_pv", None) is None:
        return None
    return [{"features": c.kvm_pv.features, "msrs": {str(k): v for k, v in c.kvm_pv.msrs.items()}}
            for c in cpus]


def parse(doc) -> list[dict] | None:
    """The decoded record, checked before anything changes. Raises StreamError."""
    if doc is None:
        return None
    try:
        return [{"features": int(d["features"]), "msrs": {int(k): int(v) for k, v in d["msrs"].items()}}
                for d in doc]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StreamError(f"migration stream: the KVM paravirtual state is malformed ({e})") from None


def load(machine: "Machine", saved: list[dict] | None) -> None:
    """Gives the destination's vCPUs the source's KVM interface, after
    their local APICs were restored."""
    cpus = bt_cpus(machine)
    if saved is None or cpus is None:
        return
    if len(saved) != len(cpus):
        raise StreamError(f"migration stream has KVM paravirtual state for {len(saved)} vCPU(s), "
                          f"this machine {len(cpus)}")
    if getattr(cpus[0], "kvm_pv", None) is None:
        kvmpv.attach(getattr(machine.engine, "bt", machine.engine), saved[0]["features"])
    for c, d in zip(cpus, saved):
        pv = c.kvm_pv
        pv.features = d["features"]
        pv.msrs = dict(d["msrs"])
        gpa = pv._system_time_gpa()
        if gpa is not None and c.memory.is_ram(gpa, 4):
            pv.pvti_version = c.memory.read_u32(gpa) & ~1      # the next update goes on from the guest's
        eoi = pv.msrs.get(kvmpv.MSR_PV_EOI_EN, 0)
        if eoi & kvmpv.MSR_ENABLED and c.lapic is not None and c.memory.is_ram(eoi & ~3, 4):
            c.lapic.set_pv_eoi(kvmpv.PvEoiFlag(c.memory, eoi & ~3))
