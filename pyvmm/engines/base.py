"""The interface every CPU engine implements.

An engine owns the vCPUs and the interrupt controller. It runs guest code
against the machine's GuestMemory and sends port and MMIO accesses it cannot
complete itself to the machine's buses. It returns from run() when the machine
asks it to stop (poweroff, reset, debug exit) or when the guest crashes."""

from __future__ import annotations

from abc import ABC, abstractmethod
import threading
from typing import TYPE_CHECKING, Protocol

from ..bus import Bus
from ..config import VmConfig
from ..costs import Costs
from ..cpu import CpuState
from ..errors import EngineError
from ..memory import GuestMemory

if TYPE_CHECKING:
    from typing import Callable

    from .callerregs import CallerRegs


class MachinePort(Protocol):
    """What an engine uses of the machine it runs (machine.Machine is one):
    guest memory and the buses, the devices by name, the config, and the
    stop request; the engine never needs the rest (run states, the event
    loop, the builder's bookkeeping)."""
    config: VmConfig
    memory: GuestMemory
    io_bus: Bus
    mmio_bus: Bus
    devices: dict
    lock: threading.RLock
    stop_status: object
    crash_state: object

    def request_stop(self, reason, detail: str = "", value: int = 0) -> None: ...

    def wait_stopped(self, timeout: float | None = None) -> bool: ...


class Engine(ABC):
    name = "?"

    def __init__(self, machine: MachinePort):
        self.machine = machine

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cpus={self.machine.config.cpus})"

    @abstractmethod
    def prepare(self) -> None:
        """Creates the vCPUs, maps guest memory, sets up the interrupt controller.

        Raises EngineError when the host cannot provide what is needed."""

    @abstractmethod
    def set_irq(self, gsi: int, level: int) -> None:
        """Drives interrupt line `gsi` to `level` (callable from any thread)."""

    def signal_msi(self, address: int, data: int) -> None:
        """Delivers an MSI (a device's write of `data` to `address` in the
        local APIC page; callable from any thread).  Engines without an
        interrupt controller drop it."""

    @abstractmethod
    def load_state(self, cpu: int, state: CpuState) -> None:
        """Loads architectural state into vCPU `cpu` (before run())."""

    @abstractmethod
    def save_state(self, cpu: int) -> CpuState:
        """Reads back the architectural state of vCPU `cpu` (while stopped)."""

    @abstractmethod
    def run(self) -> None:
        """Runs all vCPUs until machine.stop_status is set.

        Raises GuestCrash when a vCPU stops in a way that cannot go on."""

    @abstractmethod
    def kick(self) -> None:
        """Makes run() notice a stop request soon; callable from any thread."""

    def pause(self) -> bool:
        """Stops every vCPU at an instruction boundary, its state saved for
        save_state() and guest time held; returns True once all have, False
        if the machine stopped first. Called from another thread while run()
        runs (Machine.pause checks the run state). Raises EngineError when
        the engine cannot pause, StateError when a vCPU does not stop."""
        raise EngineError(f"the {self.name} engine cannot pause")

    def resume(self) -> None:
        """Lets vCPUs stopped by pause() go on, guest time with them."""
        raise EngineError(f"the {self.name} engine cannot resume")

    def stats(self) -> dict:
        """Counters for --stats (exits by reason, translations, ...)."""
        return {}

    def costs(self) -> Costs:
        """The engine-neutral cost counters and times (costs.py) of the run so far."""
        return Costs(engine=self.name)

    def platform_devices(self) -> dict:
        """name -> device for platform state the engine keeps itself (an
        in-kernel irqchip), so snapshots save and reset it with the rest;
        taken right after prepare(), as the power-on state."""
        return {}

    # -- what installers of guest interfaces ask of an engine (after prepare(),
    # before run(): paravirt/install.py, devices/vmware_install.py).  The
    # defaults say "not offered"; an engine overrides what it can do.
    def add_cpuid_leaves(self, leaves: dict[int, tuple[int, int, int, int]],
                         hypervisor_bit: bool = False) -> None:
        """Puts `leaves` (leaf -> eax, ebx, ecx, edx) in front of every
        vCPU's CPUID; a later call wins on the same leaf.  With
        hypervisor_bit, leaf 1 says "under a hypervisor" where the engine's
        own table does not already.  Raises EngineError where not offered."""
        raise EngineError(f"the {self.name} engine cannot add CPUID leaves")

    def cpuid_leaf(self, leaf: int) -> tuple[int, int, int, int]:
        """What vCPU 0's CPUID answers for `leaf`, subleaf 0, added leaves
        included. Raises EngineError where not offered."""
        raise EngineError(f"the {self.name} engine cannot report CPUID leaves")

    def guest_clock_hz(self) -> tuple[int, int]:
        """(TSC rate, local APIC bus rate) the guest sees; 0 where unknown."""
        return 0, 0

    def shadows_guest_page_tables(self) -> bool:
        """True where page-table writes from outside the guest may go unseen
        by the engine (so paravirt/install.py withholds the MMU hypercalls)."""
        return False

    def attach_hypercalls(self, hv, msr: int) -> bool:
        """Routes the guest's hypercalls (vmcall, the hypercall page that
        MSR `msr` places) to paravirt dispatcher `hv`; False where the engine
        offers no such path. Raises EngineError when the host cannot."""
        return False

    def port_caller(self, ports: frozenset[int]) -> Callable[[], CallerRegs] | None:
        """For a device at `ports` that reads and writes the registers of
        the vCPU accessing it (the VMware backdoor): a function that gives
        those registers during an access, or None where not offered.  Where
        the engine decides I/O permission, `ports` are opened to CPL3."""
        return None

    def close(self) -> None:
        """Releases host resources (file descriptors, threads)."""
