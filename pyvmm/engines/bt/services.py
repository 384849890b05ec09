"""What the bt engine offers the installers of guest interfaces
(paravirt/install.py, devices/vmware_install.py); BtEngine's methods of the
same names (engines/base.py) call these."""

from __future__ import annotations

from typing import Callable

from ..callerregs import CallerRegs
from .cpuid import CpuidOverlay


def add_cpuid_leaves(eng, leaves: dict[int, tuple[int, int, int, int]], hypervisor_bit: bool) -> None:
    """One more CpuidOverlay in front of every vCPU's table (the last added answers first)."""
    for c in eng.cpus:
        c.cpuid = CpuidOverlay(c.cpuid, leaves, hypervisor_bit)


def cpuid_leaf(eng, leaf: int) -> tuple[int, int, int, int]:
    return eng.cpus[0].cpuid.lookup(leaf, 0)


def clock_hz() -> tuple[int, int]:
    """The guest clock's fixed TSC and APIC bus rates (devices/platform/clock.py)."""
    from ...devices.platform.clock import APIC_BUS_HZ, TSC_HZ
    return TSC_HZ, APIC_BUS_HZ


def attach_hypercalls(eng, hv, msr: int) -> None:
    """vmcall and the hypercall-page MSR go to hv from every vCPU (bt/pvcall.py, bt/system.py)."""
    for c in eng.cpus:
        c.pv = hv
        c.pv_msr = msr


class CallerNotingIo:
    """One bt vCPU's view of the I/O bus: notes the vCPU before a read of
    `ports`, passes everything to the bus (attributes included)."""

    def __init__(self, bus, c, ports: frozenset[int], current: list):
        self.bus = bus
        self.c = c
        self.ports = ports
        self.current = current

    def __repr__(self) -> str:
        return f"CallerNotingIo(cpu{self.c.index}, {self.bus!r})"

    def read(self, port: int, size: int) -> int:
        if port in self.ports:
            self.current[0] = self.c
        return self.bus.read(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        self.bus.write(port, size, value)

    def read_many(self, port: int, size: int, count: int) -> bytes:
        if port in self.ports:          # `rep ins` from such a port reads registers too
            self.current[0] = self.c
        return self.bus.read_many(port, size, count)

    def __getattr__(self, name):
        return getattr(self.bus, name)


def port_caller(eng, ports: frozenset[int]) -> Callable[[], CallerRegs]:
    """vCPUs take turns in one thread: each BtCpu's port path (c.io) is
    wrapped to name itself before a read of `ports`, and the ports are open
    to CPL3 regardless of IOPL (c.io_open, bt/system.py iocheck)."""
    from .pvcall import _REGS, BtVcpuPort
    current: list = [None]
    for c in eng.cpus:
        c.io = CallerNotingIo(c.io, c, ports, current)
        c.io_open = ports

    def regs() -> CallerRegs:
        c = current[0]
        R = c.R

        def set_(name: str, value: int) -> None:
            R[_REGS[name]] = value
        return CallerRegs(BtVcpuPort(c), set_, lambda: None)
    return regs
