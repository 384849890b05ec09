"""What the stream's CONFIG and STATE records hold, and loading them into a
destination machine: the snapshot format's vCPU and device encodings
(snapshot/vmstate.py), which are engine-neutral (CpuState, device save()
envelopes), so a bt source loads into hybrid and back."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import hotplugged
from ..device import DeviceStateError
from ..snapshot.vmstate import (OPTIONAL_DEVICES, restore_devices_and_cpus, VmStateError, check_device_versions,
                                cpu_from_json, cpu_to_json)
from . import kvmpv_state
from .stream import StreamError

if TYPE_CHECKING:
    from ..machine import Machine


def warm_up() -> None:
    """Imports what saving and loading the state imports on first use (the
    KVM platform's MSR list, the FPU image code, the savevm helpers): done
    during the downtime, the first import cost ~120 ms."""
    import importlib
    for name in ("pyvmm.migrate", "pyvmm.engines.kvm.platform_state", "pyvmm.engines.bt.fxstate",
                 "pyvmm.engines.bt.system", "pyvmm.engines.bt.faults", "pyvmm.snapshot.savevm"):
        importlib.import_module(name)


def config_doc(machine: "Machine") -> dict:
    """The CONFIG record: the source's configuration (MACs and image paths
    with it) and what the destination's machine must match."""
    return {"config": machine.config.to_dict(), "engine": machine.config.engine, "cpus": machine.config.cpus,
            "ram": [[r.gpa, r.size] for r in machine.memory.regions], "devices": sorted(machine.devices),
            "hotplugged": hotplugged.records(machine)}


def replug(machine: "Machine", doc: dict) -> None:
    """Plugs the source's device_add devices this machine lacks into their
    slots (hotplugged.py), before any state arrives. Raises StreamError."""
    try:
        hotplugged.replug(machine, hotplugged.missing(machine, doc.get("hotplugged")))
    except hotplugged.ReplugError as e:
        raise StreamError(f"migration stream: {e}") from None


def check_config(machine: "Machine", doc: dict) -> None:
    """Refuses a source whose RAM layout or vCPU count differ from the
    destination machine's. Raises StreamError."""
    ram = [[r.gpa, r.size] for r in machine.memory.regions]
    if doc.get("ram") != ram:
        raise StreamError(f"the source's RAM layout {_mib(doc.get('ram'))} MiB differs from this machine's "
                          f"{_mib(ram)} MiB (start the destination with the source's options)")
    if doc.get("cpus") != machine.config.cpus:
        raise StreamError(f"the source has {doc.get('cpus')!r} vCPU(s), this machine {machine.config.cpus}")


def _mib(ram) -> str:
    try:
        return str(sum(size for _, size in ram) >> 20)
    except (TypeError, ValueError):
        return "?"


def state_doc(machine: "Machine") -> dict:
    """The STATE record of a machine whose vCPUs are stopped."""
    with machine.lock:
        doc = {"engine": machine.engine.name, "user_code_in_kvm": _user_code_fits_kvm(machine),
               "cpus": [cpu_to_json(machine.engine.save_state(i)) for i in range(machine.config.cpus)],
               "devices": {name: dev.save() for name, dev in machine.devices.items()}}
        pv = kvmpv_state.save(machine)
        if pv is not None:
            doc["kvm_pv"] = pv
        bt_cpus = kvmpv_state.bt_cpus(machine)
        if bt_cpus:
            # What the guest moved its TSC by (IA32_TSC, TSC_ADJUST writes): no
            # CpuState field, and its clocksource must not step back.
            doc["tsc_offsets"] = [c.tsc_offset for c in bt_cpus]
        if machine.engine.name in ("hw", "bt") and machine.config.irqchip:
            # The interrupt platform in engine-neutral terms (migrate.py), for a
            # destination whose engine keeps it elsewhere (KVM's chips vs bt's models).
            from ..migrate import _take_platform
            doc["platform"] = _take_platform(machine, machine.engine)
        return doc


def _user_code_fits_kvm(machine: "Machine") -> bool:
    """Whether the guest's user code may run under KVM on a hybrid
    destination.  KVM here (kvm_pvm) lets user-mode rdtsc read the host's
    raw TSC, so a kernel booted under bt or hw, which offer an invariant TSC
    and kvmclock, hands its user space (the vDSO) a TSC clock that reads
    the wrong counter there: time jumps by hours.  Only a guest booted under
    hybrid (tsc=unstable, no kvmclock: the vDSO makes system calls) is safe."""
    return machine.engine.name == "hybrid" and getattr(machine.engine, "user_in_kvm", False)


# Where hw keeps the interrupt platform and guest time (KVM) and bt keeps
# them (Python models): carried as doc["platform"] between the two instead.
PLATFORM_DEVICES = {"kvm_platform", "pv_doorbell", "clock", "intc"}


def _other_family(machine: "Machine", doc: dict) -> bool:
    source = doc.get("engine")
    return isinstance(source, str) and (source == "hw") != (machine.engine.name == "hw")


def _platform_from_json(platform) -> dict:
    if not isinstance(platform, dict) or not isinstance(platform.get("cpus"), list):
        raise StreamError("migration stream: the source's interrupt platform is missing or malformed")
    try:
        for cpu in platform["cpus"]:
            cpu["msrs"] = {int(k): int(v) for k, v in cpu["msrs"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StreamError(f"migration stream: the source's interrupt platform is malformed ({e})") from None
    return platform


def load_state(machine: "Machine", doc: dict) -> None:
    """Loads a STATE record into a machine that has not run. Everything is
    decoded and checked before anything changes. Raises StreamError."""
    cpus_json, devices = doc.get("cpus"), doc.get("devices")
    if not isinstance(cpus_json, list) or not isinstance(devices, dict):
        raise StreamError("migration stream state record lacks cpus or devices")
    try:
        cpus = [cpu_from_json(c) for c in cpus_json]
    except VmStateError as e:
        raise StreamError(str(e).replace("vmstate: ", "migration stream: ")) from None
    if len(cpus) != machine.config.cpus:
        raise StreamError(f"migration stream has {len(cpus)} vCPU state(s), this machine {machine.config.cpus}")
    pv = kvmpv_state.parse(doc.get("kvm_pv"))
    tsc_offsets = doc.get("tsc_offsets")
    if tsc_offsets is not None and (not isinstance(tsc_offsets, list) or len(tsc_offsets) != len(cpus)
                                    or not all(isinstance(x, int) for x in tsc_offsets)):
        raise StreamError("migration stream: the vCPUs' TSC offsets are malformed")
    here = set(machine.devices)
    platform = None
    if _other_family(machine, doc):
        if machine.engine.name not in ("hw", "bt"):
            raise StreamError(f"migration from {doc.get('engine')} to {machine.engine.name} is not supported "
                              f"(hw moves to and from bt)")
        platform = _platform_from_json(doc.get("platform"))
        devices = {k: v for k, v in devices.items() if k not in PLATFORM_DEVICES}
        devices.update({name: None for name in here & PLATFORM_DEVICES})
    extra = here - set(devices)
    if extra <= set(OPTIONAL_DEVICES):       # e.g. bt's paravirt interface: power-on state
        devices = {**devices, **{name: None for name in extra}}
    # A device only the source has (bt's paravirt interface, going to hybrid)
    # may stay behind if the guest never discovered it.
    for name in set(devices) - here:
        if name in OPTIONAL_DEVICES and _untouched(devices[name]):
            devices = {k: v for k, v in devices.items() if k != name}
    if set(devices) != here:
        diff = ", ".join(sorted(set(devices) ^ here))
        raise StreamError(f"the source's devices differ from this machine's (in: {diff})")
    try:
        check_device_versions(machine, devices)
    except DeviceStateError as e:
        raise StreamError(f"migration stream: {e}") from None
    if machine.engine.name == "hybrid" and not doc.get("user_code_in_kvm"):
        machine.engine.keep_user_code_in_bt(f"the incoming guest booted under {doc.get('engine')}, "
                                            f"its user space may read the TSC")
    with machine.lock:
        try:
            restore_devices_and_cpus(machine, devices, cpus)
            if platform is not None:
                _give_platform(machine, platform)
            kvmpv_state.load(machine, pv)
            if platform is None and tsc_offsets is not None and kvmpv_state.bt_cpus(machine):
                for c, offset in zip(kvmpv_state.bt_cpus(machine), tsc_offsets):
                    c.tsc_offset = offset
        except OSError as e:
            raise StreamError(f"migration stream: KVM refused the interrupt platform ({e.strerror or e})") from None
        except (DeviceStateError, KeyError, TypeError, ValueError) as e:
            raise StreamError(f"migration stream: a device refused its state ({e})") from None


def _untouched(state) -> bool:
    """Whether a paravirt-style device state is its power-on state: no
    pages registered, no calls made, no timer armed."""
    if not isinstance(state, dict):
        return False
    return (not state.get("page_msr") and not state.get("shared") and not any(state.get("counts") or [])
            and state.get("timer_deadline_ns") is None and not state.get("errors"))


def _give_platform(machine: "Machine", platform: dict) -> None:
    """Loads the source's engine-neutral platform after the vCPU states."""
    if machine.engine.name == "hw":
        machine.devices["kvm_platform"].from_models(platform)
    else:
        from ..migrate import _give_bt
        _give_bt(machine.engine, platform)
