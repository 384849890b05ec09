"""The interface every CPU engine implements.

An engine owns the vCPUs and the interrupt controller. It runs guest code
against the machine's GuestMemory and sends port and MMIO accesses it cannot
complete itself to the machine's buses. It returns from run() when the machine
asks it to stop (poweroff, reset, debug exit) or when the guest crashes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from ..costs import Costs
from ..cpu import CpuState

if TYPE_CHECKING:
    from ..machine import Machine


class Engine(ABC):
    name = "?"

    def __init__(self, machine: "Machine"):
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

    def stats(self) -> dict:
        """Counters for --stats (exits by reason, translations, ...)."""
        return {}

    def costs(self) -> Costs:
        """The engine-neutral cost counters and times (costs.py) of the run so far."""
        return Costs(engine=self.name)

    def close(self) -> None:
        """Releases host resources (file descriptors, threads)."""
