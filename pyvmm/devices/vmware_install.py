"""Wiring the VMware backdoor (devices/vmware_backdoor.py) into a built
machine whose engine is prepared (config.vmware_backdoor).

The device needs the registers of the vCPU that ran `in`; the engine gives
them (engines/base.py Engine.port_caller):
  hw: the port exit runs in the vCPU's thread, whose registers are read
      through KVM (engines/kvm/services.py);
  bt: vCPUs take turns in one thread; each BtCpu's port path is wrapped to
      name the vCPU before a backdoor access (engines/bt/services.py).
Under bt the backdoor ports are also opened to CPL3 regardless of IOPL, as
VMware does.  Under hw that is KVM's business: on a host whose KVM emulates
guest kernel mode (kvm_pvm) a CPL3 `in` without I/O permission is #GP in
the guest before pyvmm sees it, so only CPL0 code (or a process with
iopl/ioperm) reaches the backdoor there.

CPUID 0x40000000 then says "VMwareVMware" (guest tools refuse a KVM
signature there) with VMware's timing leaf 0x40000010; KVM's leaves move
to 0x40000200/1, where Linux still finds them (it scans every 0x100 and
prefers KVM), and pyvmm's own stay at 0x40000100 (docs/vmware-backdoor.md).
The timing leaf gives the TSC and APIC bus rates the engine reports."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from ..errors import EngineError
from ..machine import Machine, StopReason
from .guestrpc import GuestRpc
from .vmware_backdoor import HB_PORT, LENGTH, PORT, VmwareBackdoor

log = logging.getLogger(__name__)

M32 = 0xFFFFFFFF
OPEN_PORTS = frozenset(range(PORT, PORT + LENGTH))
CPUID_BASE = 0x40000000         # hypervisor signature leaf
CPUID_TIMING = 0x40000010       # VMware's TSC / bus frequency leaf
VMWARE_SIGNATURE = b"VMwareVMware"
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_MOVED_BASE = 0x40000200     # where KVM's leaves go (pyvmm's own are at 0x40000100)


def _words(sig: bytes) -> tuple[int, int, int]:
    return tuple(int.from_bytes(sig[i:i + 4], "little") for i in (0, 4, 8))


def vmware_leaves(tsc_hz: int, bus_hz: int) -> dict[int, tuple[int, int, int, int]]:
    """CPUID 0x40000000 ("VMwareVMware", leaves up to 0x40000010) and the
    timing leaf 0x40000010 (EAX TSC kHz, EBX APIC bus kHz; ECX 0: the
    backdoor is the I/O port, not vmcall/vmmcall)."""
    return {CPUID_BASE: (CPUID_TIMING, *_words(VMWARE_SIGNATURE)),
            CPUID_TIMING: (tsc_hz // 1000 & M32, bus_hz // 1000 & M32, 0, 0)}


def moved_kvm_leaves(sig: tuple[int, int, int, int], feat: tuple[int, int, int, int]) -> dict:
    """KVM's signature and feature leaves at KVM_MOVED_BASE (Linux and KVM
    look for the KVM signature every 0x100 leaves), so a Linux guest keeps
    kvmclock & co. while 0x40000000 says VMware."""
    if tuple(sig[1:]) != _words(KVM_SIGNATURE):
        return {}
    return {KVM_MOVED_BASE: (KVM_MOVED_BASE + 1, *sig[1:]), KVM_MOVED_BASE + 1: tuple(feat)}


def cpuid_leaves(eng) -> dict[int, tuple[int, int, int, int]]:
    """VMware's leaves and KVM's moved, from the engine's clock rates and
    the CPUID it answers now (pyvmm's leaves, added before, stay)."""
    tsc_hz, bus_hz = eng.guest_clock_hz()
    leaves = vmware_leaves(tsc_hz, bus_hz)
    leaves.update(moved_kvm_leaves(eng.cpuid_leaf(CPUID_BASE), eng.cpuid_leaf(CPUID_BASE + 1)))
    return leaves


def guest_log_sink(text: str) -> None:
    """Where "log" requests go: one line on pyvmm's stderr."""
    sys.stderr.write(f"pyvmm: guest log: {text}\n")
    sys.stderr.flush()


def attach(machine: Machine, on_log: Callable[[str], None] = guest_log_sink) -> VmwareBackdoor:
    """Adds the backdoor at ports 0x5658-0x5659. Raises EngineError for an
    engine that cannot give the calling vCPU's registers, BusError if the
    ports are taken."""
    eng = machine.engine

    def poweroff() -> None:
        machine.request_stop(StopReason.POWEROFF, "vmware backdoor poweroff")

    rpc = GuestRpc(getattr(machine.config, "guestinfo", None) or {}, on_log, poweroff)
    regs = eng.port_caller(OPEN_PORTS)
    if regs is None:
        raise EngineError(f"vmware backdoor: engine {eng.name!r} not supported")
    eng.add_cpuid_leaves(cpuid_leaves(eng), hypervisor_bit=True)
    dev = VmwareBackdoor(regs, rpc, *eng.guest_clock_hz())
    machine.io_bus.insert(PORT, LENGTH, dev, "vmware-backdoor")
    machine.devices["vmware_backdoor"] = dev
    log.debug("vmware backdoor on %s at %#x/%#x", eng.name, PORT, HB_PORT)
    return dev
