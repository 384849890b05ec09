"""A running virtual machine: memory, buses, devices and one CPU engine."""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .bus import Bus
from .config import VmConfig
from .device import Stateful
from .errors import StateError
from .memory import GuestMemory
from .runstate import RunState, require

if TYPE_CHECKING:
    from .loop import EventLoop
    from .engines.base import Engine

log = logging.getLogger(__name__)


class StopReason(enum.Enum):
    """Why a machine stopped; the CLI maps each to a process exit code
    (cli/exitcodes.py), the machine and its engines never see one."""
    POWEROFF = "poweroff"      # guest powered off (ACPI, test device)
    RESET = "reset"            # guest asked for a reset (i8042, triple fault)
    DEBUG_EXIT = "debug-exit"  # guest wrote StopStatus.value to the isa-debug-exit port
    HALTED = "halted"          # every vCPU halted with interrupts off: nothing can wake it
    USER = "user"              # the user quit (Ctrl-A x, signal, QMP quit)
    ERROR = "error"            # a vCPU thread failed; run() raises what it was


@dataclass
class StopStatus:
    reason: StopReason
    detail: str = ""
    value: int = 0  # DEBUG_EXIT: the value the guest wrote


@dataclass
class Machine:
    config: VmConfig
    memory: GuestMemory
    io_bus: Bus
    mmio_bus: Bus
    lock: threading.RLock
    # Every piece of device state by name (device.py's contract); the
    # bus-mapped ones are also on io_bus or mmio_bus.
    devices: dict[str, Stateful] = field(default_factory=dict)
    engine: "Engine | None" = None
    boot_protocol: str = ""
    stop_status: StopStatus | None = None
    crash_state: object = None  # CpuState of a vCPU that crashed, for reports
    # The machine's one event loop (loop.py): console input, timers; its
    # callbacks run under `lock`.  The builder makes and starts it.
    loop: "EventLoop | None" = None
    # Called by destroy_machine after the devices stop: files the builder opened.
    closers: list = field(default_factory=list)
    # Called by pause() once the vCPUs stopped, from its thread without
    # `lock`: each returns when its device's work in flight (disk requests)
    # has completed into guest memory, so a paused machine saves whole.
    drains: list = field(default_factory=list)
    state: RunState = RunState.CONFIGURED
    _stop_event: threading.Event = field(default_factory=threading.Event)
    # Orders run-state commands; not `lock`, which vCPUs take for I/O while
    # a pause waits for them.
    _phase: threading.Lock = field(default_factory=threading.Lock)

    # -- run state (runstate.py) -------------------------------------------------
    def run(self) -> None:
        """Runs the engine until a stop request: configured -> running ->
        stopped. Raises StateError in another state, and whatever the
        engine's run() raises (GuestCrash)."""
        with self._phase:
            require(self.state, "run", RunState.CONFIGURED)
            self.state = RunState.RUNNING
        try:
            self.engine.run()
        finally:
            with self._phase:
                self.state = RunState.STOPPED

    def pause(self) -> None:
        """Stops every vCPU at an instruction boundary with its state saved
        (engine.save_state() reads it) and guest time held; returns once they
        all have. Any thread but a vCPU's, without holding `lock`. Raises
        StateError unless running (or if the machine stops meanwhile)."""
        with self._phase:
            require(self.state, "pause", RunState.RUNNING)
            if not self.engine.pause():
                raise StateError("pause: the machine stopped")
            try:
                for drain in self.drains:
                    drain()
            except StateError:
                self.engine.resume()
                raise
            self.state = RunState.PAUSED

    def resume(self) -> None:
        """Lets the vCPUs of a paused machine go on, guest time with them.
        Raises StateError unless paused."""
        with self._phase:
            require(self.state, "resume", RunState.PAUSED)
            self.engine.resume()
            self.state = RunState.RUNNING

    def request_stop(self, reason: StopReason, detail: str = "", value: int = 0) -> None:
        """Asks the engine to stop for `reason` (`value`: what a DEBUG_EXIT
        guest wrote); the first request wins. Any thread."""
        with self.lock:
            if self.stop_status is None:
                self.stop_status = StopStatus(reason, detail, value)
                log.debug("stop requested: %s %s", reason.value, detail)
        self._stop_event.set()
        if self.engine is not None:
            self.engine.kick()

    def clear_stop(self) -> None:
        """Forgets a handled stop request so the engine can run again
        (engine switching, migrate.py). Call only while no engine runs."""
        with self.lock:
            self.stop_status = None
        self._stop_event.clear()
        with self._phase:
            if self.state is RunState.STOPPED:
                self.state = RunState.CONFIGURED

    @property
    def stopping(self) -> bool:
        return self.stop_status is not None

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stop_event.wait(timeout)
