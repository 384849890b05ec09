"""A running virtual machine: memory, buses, devices and one CPU engine."""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .bus import Bus
from .config import VmConfig
from .memory import GuestMemory

if TYPE_CHECKING:
    from .engines.base import Engine

log = logging.getLogger(__name__)


class StopReason(enum.Enum):
    POWEROFF = "poweroff"      # guest powered off (ACPI, test device)
    RESET = "reset"            # guest asked for a reset (i8042, triple fault)
    DEBUG_EXIT = "debug-exit"  # guest wrote to the isa-debug-exit port
    HALTED = "halted"          # every vCPU halted with interrupts off: nothing can wake it
    USER = "user"              # the user quit (Ctrl-A x, signal)


# pyvmm's exit codes (documented in the README and --help).
EXIT_OK = 0          # guest powered off, or reset with --no-reboot, or user quit
EXIT_ERROR = 1       # bad input or host problem (one-line error)
EXIT_USAGE = 2       # bad command line
EXIT_GUEST_CRASH = 3  # the engine could not go on (e.g. KVM emulation failure)
EXIT_HALTED = 4      # guest halted forever with interrupts disabled


@dataclass
class StopStatus:
    reason: StopReason
    code: int = 0  # the process exit code this stop maps to
    detail: str = ""


@dataclass
class Machine:
    config: VmConfig
    memory: GuestMemory
    io_bus: Bus
    mmio_bus: Bus
    lock: threading.RLock
    devices: dict[str, object] = field(default_factory=dict)
    engine: "Engine | None" = None
    boot_protocol: str = ""
    stop_status: StopStatus | None = None
    crash_state: object = None  # CpuState of a vCPU that crashed, for reports
    _stop_event: threading.Event = field(default_factory=threading.Event)

    def request_stop(self, reason: StopReason, code: int = 0, detail: str = "") -> None:
        """Asks the engine to stop; the first request wins. Any thread."""
        with self.lock:
            if self.stop_status is None:
                self.stop_status = StopStatus(reason, code, detail)
                log.debug("stop requested: %s code=%d %s", reason.value, code, detail)
        self._stop_event.set()
        if self.engine is not None:
            self.engine.kick()

    def clear_stop(self) -> None:
        """Forgets a handled stop request so the engine can run again
        (engine switching, migrate.py). Call only while no engine runs."""
        with self.lock:
            self.stop_status = None
        self._stop_event.clear()

    @property
    def stopping(self) -> bool:
        return self.stop_status is not None

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stop_event.wait(timeout)
