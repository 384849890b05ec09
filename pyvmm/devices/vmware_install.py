"""Wiring the VMware backdoor (devices/vmware_backdoor.py) into a built
machine whose engine is prepared (config.vmware_backdoor).

The device needs the registers of the vCPU that ran `in`; each engine
gives them the way the paravirtual doorbell gets them:
  hw: the port exit runs in the vCPU's thread; engine.current.vcpu is that
      vCPU and pvexit.KvmVcpuPort reads its registers (written back with
      KVM_SET_REGS before KVM completes the `in` into EAX);
  bt: vCPUs take turns in one thread; each BtCpu's port path (c.io) is
      wrapped so an access to the backdoor ports first names that vCPU,
      whose registers pvcall.BtVcpuPort reads from c.R.
Under bt the backdoor ports are also opened to CPL3 regardless of IOPL
(c.io_open, checked by bt/system.py iocheck), as VMware does.  Under hw
that is KVM's business: on a host whose KVM emulates guest kernel mode
(kvm_pvm) a CPL3 `in` without I/O permission is #GP in the guest before
pyvmm sees it, so only CPL0 code (or a process with iopl/ioperm) reaches
the backdoor there.

CPUID 0x40000000 then says "VMwareVMware" (guest tools refuse a KVM
signature there) with VMware's timing leaf 0x40000010; KVM's leaves move
to 0x40000200/1, where Linux still finds them (it scans every 0x100 and
prefers KVM), and pyvmm's own stay at 0x40000100 (docs/vmware-backdoor.md)."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from ..engines.bt.cpuid import CpuidOverlay
from ..errors import EngineError
from ..machine import EXIT_OK, Machine, StopReason
from .guestrpc import GuestRpc
from .vmware_backdoor import HB_PORT, LENGTH, PORT, VmwareBackdoor

log = logging.getLogger(__name__)

KVM_GET_TSC_KHZ = 0xAEA3      # _IO(KVMIO, 0xa3)
KVM_APIC_BUS_HZ = 1_000_000_000  # KVM's in-kernel local APIC: one bus cycle per ns
M32 = 0xFFFFFFFF
OPEN_PORTS = frozenset(range(PORT, PORT + LENGTH))
CPUID_BASE = 0x40000000         # hypervisor signature leaf
CPUID_TIMING = 0x40000010       # VMware's TSC / bus frequency leaf
VMWARE_SIGNATURE = b"VMwareVMware"
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_MOVED_BASE = 0x40000200     # where KVM's leaves go (pyvmm's own are at 0x40000100)


class _PortRegs:
    """BackdoorRegs over a paravirt VcpuPort (reg() reads) plus a setter."""

    __slots__ = ("port", "_set", "_commit")

    def __init__(self, port, set_: Callable[[str, int], None], commit: Callable[[], None]):
        self.port = port
        self._set = set_
        self._commit = commit

    def get(self, name: str) -> int:
        return self.port.reg(name)

    def set(self, name: str, value: int) -> None:
        self._set(name, value & M32)    # a 32-bit register write: upper half zero

    def commit(self) -> None:
        self._commit()


def _bt_regs(c) -> _PortRegs:
    from ..engines.bt.pvcall import _REGS, BtVcpuPort
    R = c.R

    def set_(name: str, value: int) -> None:
        R[_REGS[name]] = value
    return _PortRegs(BtVcpuPort(c), set_, lambda: None)


def _kvm_regs(vcpu) -> _PortRegs:
    from ..engines.kvm.pvexit import KvmVcpuPort
    port = KvmVcpuPort(vcpu)
    dirty = []

    def set_(name: str, value: int) -> None:
        setattr(port.regs, name, value)
        dirty.append(name)

    def commit() -> None:
        if dirty:
            vcpu.set_regs(port.regs)   # RIP unchanged: KVM then completes the `in`
    return _PortRegs(port, set_, commit)


class _BtCpuIo:
    """One bt vCPU's view of the I/O bus: notes the vCPU before a backdoor
    access, passes everything to the bus (attributes included)."""

    def __init__(self, bus, c, current: list):
        self.bus = bus
        self.c = c
        self.current = current

    def __repr__(self) -> str:
        return f"_BtCpuIo(cpu{self.c.index}, {self.bus!r})"

    def read(self, port: int, size: int) -> int:
        if port in OPEN_PORTS:
            self.current[0] = self.c
        return self.bus.read(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        self.bus.write(port, size, value)

    def __getattr__(self, name):
        return getattr(self.bus, name)


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


class VmwareCpuidTable(CpuidOverlay):
    """A bt CpuidTable with VMware's hypervisor leaves in front (same lookup())."""

    def __init__(self, inner, tsc_hz: int, bus_hz: int):
        leaves = vmware_leaves(tsc_hz, bus_hz)
        leaves.update(moved_kvm_leaves(inner.lookup(CPUID_BASE, 0), inner.lookup(CPUID_BASE + 1, 0)))
        super().__init__(inner, leaves, hypervisor_bit=True)


def _kvm_cpuid(eng, tsc_hz: int, bus_hz: int) -> None:
    """VMware's leaves (and KVM's moved) in every hw vCPU's CPUID table,
    pyvmm's paravirtual leaves kept."""
    from ..engines.kvm import cpuid, pvexit
    from ..paravirt import abi
    cfg = eng.machine.config
    table = {e.function: (e.eax, e.ebx, e.ecx, e.edx)
             for e in cpuid.guest_cpuid(eng.kvm.supported_cpuid(), 0, cfg.cpus, cpuid.expand_hidden(cfg.cpuid_hide))}
    leaves = vmware_leaves(tsc_hz, bus_hz)
    leaves.update(moved_kvm_leaves(table.get(CPUID_BASE, (0, 0, 0, 0)), table.get(CPUID_BASE + 1, (0, 0, 0, 0))))
    if getattr(cfg, "paravirt", True):
        leaves.update(abi.cpuid_leaves())
    pvexit.add_cpuid(eng, leaves)


def _kvm_tsc_hz(eng) -> int:
    """The guest TSC rate KVM gives vCPU 0 (0 when KVM will not say)."""
    import fcntl
    try:
        khz = fcntl.ioctl(eng.vcpus[0].fd, KVM_GET_TSC_KHZ)
    except (OSError, IndexError, AttributeError):
        return 0
    return max(khz, 0) * 1000


def guest_log_sink(text: str) -> None:
    """Where "log" requests go: one line on pyvmm's stderr."""
    sys.stderr.write(f"pyvmm: guest log: {text}\n")
    sys.stderr.flush()


def attach(machine: Machine, on_log: Callable[[str], None] = guest_log_sink) -> VmwareBackdoor:
    """Adds the backdoor at ports 0x5658-0x5659. Raises EngineError for an
    engine it does not know, BusError if the ports are taken."""
    eng = machine.engine

    def poweroff() -> None:
        machine.request_stop(StopReason.POWEROFF, EXIT_OK, "vmware backdoor poweroff")

    rpc = GuestRpc(getattr(machine.config, "guestinfo", None) or {}, on_log, poweroff)
    if eng.name == "bt":
        from .platform.clock import APIC_BUS_HZ, TSC_HZ
        current: list = [None]
        for c in eng.cpus:
            c.io = _BtCpuIo(c.io, c, current)
            c.io_open = OPEN_PORTS
            c.cpuid = VmwareCpuidTable(c.cpuid, TSC_HZ, APIC_BUS_HZ)
        dev = VmwareBackdoor(lambda: _bt_regs(current[0]), rpc, TSC_HZ, APIC_BUS_HZ)
    elif eng.name == "hw":
        def regs():
            vcpu = getattr(eng.current, "vcpu", None)
            if vcpu is None:
                raise EngineError("vmware backdoor accessed outside a vCPU thread")
            return _kvm_regs(vcpu)
        tsc_hz = _kvm_tsc_hz(eng)
        _kvm_cpuid(eng, tsc_hz, KVM_APIC_BUS_HZ)
        dev = VmwareBackdoor(regs, rpc, tsc_hz, KVM_APIC_BUS_HZ)
    else:
        raise EngineError(f"vmware backdoor: engine {eng.name!r} not supported")
    machine.io_bus.insert(PORT, LENGTH, dev, "vmware-backdoor")
    machine.devices["vmware_backdoor"] = dev
    log.debug("vmware backdoor on %s at %#x/%#x", eng.name, PORT, HB_PORT)
    return dev
