"""The machine's run state, and the gate where paused vCPU threads wait.

States and the commands that move between them:

    configured --run--> running --pause--> paused --resume--> running
         any state --stop--> stopped   (clear_stop: stopped -> configured)

A command given in a state it does not allow fails with a one-line
StateError ("pause: not while configured"), as Firecracker's pre- and
post-boot actions do, instead of doing something undefined.

`PauseGate` is the engines' half of pause/resume: the controlling thread
closes the gate and kicks the vCPUs; each vCPU thread, when it notices the
closed gate at an instruction boundary (a bt slice end, a KVM_RUN that
returned EINTR), parks in it with its state where save_state() reads it;
close() returns once every vCPU thread is parked, and open() lets them go
on."""

from __future__ import annotations

import enum
import threading
import time
from typing import Callable

from .errors import StateError

PAUSE_TIMEOUT_S = 30.0   # a vCPU that does not reach a boundary by then is a bug
KICK_EVERY_S = 0.05      # re-kick while waiting: a kick can land just before a thread looks


class RunState(enum.Enum):
    CONFIGURED = "configured"   # built, not started (or stopped and cleared to run again)
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


def require(state: RunState, command: str, *allowed: RunState) -> None:
    """Raises StateError unless `state` is one of `allowed`."""
    if state not in allowed:
        raise StateError(f"{command}: not while {state.value}")


class PauseGate:
    """Where an engine's vCPU threads wait while the machine is paused.

    `closed` is a plain attribute so hot loops can test it without a lock;
    a thread that sees it late only parks one slice or one KVM exit later."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.closed = False
        self.parked = 0          # threads waiting in park() now

    def __repr__(self) -> str:
        return f"PauseGate(closed={self.closed}, parked={self.parked})"

    def close(self, threads: int, kick: Callable[[], None], stopping: Callable[[], bool],
              timeout: float = PAUSE_TIMEOUT_S) -> bool:
        """Asks the vCPU threads to park and waits until `threads` of them
        have; False if the machine stopped first. Raises StateError when
        they do not park within `timeout` seconds (the gate is opened again)."""
        with self._cond:
            self.closed = True
        deadline = time.monotonic() + timeout
        while True:
            kick()
            with self._cond:
                if self.parked >= threads:
                    return True
                if stopping():
                    return False
                if time.monotonic() > deadline:
                    self._open_locked()
                    raise StateError(f"pause: {threads - self.parked} vCPU(s) did not stop in {timeout:.0f} s")
                self._cond.wait(KICK_EVERY_S)

    def open(self) -> None:
        """Lets the parked threads go on."""
        with self._cond:
            self._open_locked()

    def _open_locked(self) -> None:
        self.closed = False
        self._cond.notify_all()

    def wake(self) -> None:
        """Makes parked threads look at `stopping` again (a stop request)."""
        with self._cond:
            self._cond.notify_all()

    def park(self, stopping: Callable[[], bool]) -> None:
        """Called by a vCPU thread at an instruction boundary, its state
        saved where save_state() reads it: waits while the gate is closed
        and the machine is not stopping."""
        with self._cond:
            if not self.closed:
                return
            self.parked += 1
            self._cond.notify_all()
            try:
                while self.closed and not stopping():
                    self._cond.wait(1.0)
            finally:
                self.parked -= 1
