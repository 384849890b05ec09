"""Snapshot files across the hw line: a state saved under bt or hybrid
loads under hw and the other way round.

The engines keep the interrupt platform apart: bt and hybrid in Python
models (machine.devices "intc" and "clock"), hw in KVM's kernel
("kvm_platform", with hw's "pv_doorbell" port). A file therefore also
carries the platform in the engine-neutral terms migrate.py moves a
running machine with (KvmPlatformState.to_models: guest time, the
models' PIC/IOAPIC/PIT/LAPIC state, and per vCPU its TSC, MSRs, run state
and pending events), in a PLAT section. A load whose device set differs
only in those platform devices gives the machine its own platform devices
from PLAT instead of their saved states."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .. import hotplugged
from ..errors import VmmError
from .vmstate import OPTIONAL_DEVICES, VmStateError, to_replug

if TYPE_CHECKING:
    from ..machine import Machine

PLATFORM_DEVICES = frozenset({"intc", "clock", "kvm_platform", "pv_doorbell"})


def take(machine: "Machine") -> dict | None:
    """The stopped machine's platform in engine-neutral terms (None where
    its engine has none to give: hw without the in-kernel irqchip)."""
    from .. import migrate
    engine = machine.engine
    if engine.name == "hw":
        return migrate._take_platform(machine, engine)
    bt = getattr(engine, "bt", engine)             # hybrid runs its platform on a bt engine
    if getattr(bt, "intc", None) is None or getattr(bt, "clock", None) is None:
        return None
    return migrate._take_bt(bt)


def adapt(machine: "Machine", sections: dict[bytes, bytes]) -> tuple[dict[bytes, bytes], dict | None]:
    """The sections to check against `machine`, and the platform to give it
    afterwards (None for a load under the same kind of engine). Where the
    saved device set and the machine's differ only in platform devices and
    the file has a platform, DEVS is rewritten: the saved platform devices
    go, the machine's are reset (then set from the platform by give())."""
    try:
        saved = json.loads(sections[b"DEVS"])
        plat = json.loads(sections.get(b"PLAT", b"null"))
    except ValueError:
        return sections, None                      # check_sections says what is wrong
    if not isinstance(saved, dict):
        return sections, None
    here = set(machine.devices)
    try:                                                    # device_add's, plugged back before the load
        here |= {hotplugged.key(r["id"]) for r in to_replug(machine, sections)}
    except VmStateError:
        return sections, None
    differ = (set(saved) ^ here) - set(OPTIONAL_DEVICES)    # check_sections settles those
    if not differ or not differ <= PLATFORM_DEVICES or not isinstance(plat, dict):
        return sections, None
    devices = {n: st for n, st in saved.items() if n not in PLATFORM_DEVICES}
    devices.update({n: None for n in here & PLATFORM_DEVICES})
    return {**sections, b"DEVS": json.dumps(devices).encode()}, _decode(plat)


def _decode(plat: dict) -> dict:
    """JSON turned the MSR numbers into strings: back to ints."""
    try:
        for cpu in plat["cpus"]:
            cpu["msrs"] = {int(k): v for k, v in cpu["msrs"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise VmStateError(f"vmstate: the PLAT section is malformed ({e})") from None
    return plat


def give(machine: "Machine", plat: dict) -> None:
    """Loads the platform into the machine whose vCPUs have their states.
    Raises VmStateError when the engine refuses it."""
    from .. import migrate
    engine = machine.engine
    try:
        if engine.name == "hw":
            kvm_platform = machine.devices.get("kvm_platform")
            if kvm_platform is None:
                raise VmStateError("vmstate: this hw machine has no in-kernel irqchip to take the saved platform")
            kvm_platform.from_models(plat)
        else:
            migrate._give_bt(getattr(engine, "bt", engine), plat)
    except OSError as e:
        raise VmStateError(f"vmstate: KVM refused the saved interrupt platform: {e.strerror or e}") from None
    except VmmError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise VmStateError(f"vmstate: the PLAT section does not fit this machine ({e})") from None
