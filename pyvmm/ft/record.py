"""The primary's side: inputs from outside enter the guest only at the top
of a scheduler round, where their guest position is logged first.

Under deterministic time (guest ns from instructions retired) the bt
scheduler's rounds, timer interrupts, RDTSC and RDRAND repeat exactly in a
second run of the same guest, so the positions of the outside inputs are
all a backup needs.  The scheduler calls round_top() before every round;
other threads only queue their input here (serial_input, frame_in,
disk_answered) and wake it."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

from ..devices.legacy.serial8250 import RX_BUFFER_SIZE
from . import log as L
from .commit import OutputCommit

logger = logging.getLogger(__name__)

MAX_LAG_INSNS = 500_000         # the primary waits when the backup is this far behind: bounds failover
LAG_WAIT_S = 0.002


def position(engine) -> tuple[int, int]:
    """The guest position: (instructions retired by all vCPUs, guest ns)."""
    return sum(c.icount for c in engine.cpus), engine.clock.now_ns()


class Recorder:
    """Applies and logs the primary's outside inputs. `send(bytes)` puts log
    records on the channel and raises OSError once the backup is gone."""

    def __init__(self, machine, send: Callable[[bytes], None], commit: OutputCommit):
        self.machine = machine
        self.engine = machine.engine
        self.send = send
        self.commit = commit
        self.pos = (0, 0)
        self.safe = (0, 0)          # every input up to here has been sent
        self.sent = (-1, -1)        # newest PROGRESS sent
        self.executed = 0           # the backup's instructions retired, from its ACKs
        self.alone = False          # the backup is gone: inputs still applied, nothing logged
        self.ended = False          # END sent: the backup hanging up is expected
        self.on_alone: Callable[[], None] | None = None
        self.events = 0
        self._inputs: deque[tuple[str, bytes]] = deque()
        self._lock = threading.Lock()
        self.virtio: list = []                  # ft/virtio.py's PrimaryBlock/PrimaryNet
        self.items: list = []                   # their held outputs (disk work, frames out)
        self.frame_commits: list = []           # those of NICs, whose counts PROGRESS carries
        self._frames: deque = deque()           # (PrimaryNet, frame) from the network
        self._answered: set = set()             # PrimaryBlocks with disk answers waiting

    @property
    def outputs(self) -> list:
        return [self.commit, *self.items]

    def __repr__(self) -> str:
        return f"Recorder(pos={self.pos}, events={self.events}, alone={self.alone})"

    # -- any thread ---------------------------------------------------------------------
    def serial_input(self, name: str, data: bytes) -> None:
        """Bytes typed at UART `name`: queued for the next round."""
        with self._lock:
            self._inputs.append((name, bytes(data)))
        self.engine.sched._wake.set()     # not kick(): that would cut the running round short

    def frame_in(self, nic, frame: bytes) -> None:
        """A frame from the network for `nic` (the event loop): delivered at the next round."""
        with self._lock:
            self._frames.append((nic, bytes(frame)))
        self.engine.sched._wake.set()

    def disk_answered(self, drive) -> None:
        """`drive`'s I/O thread answered a request: completed at the next round."""
        with self._lock:
            self._answered.add(drive)
        self.engine.sched._wake.set()

    def acknowledged(self, pos: tuple[int, int]) -> None:
        """The backup holds the log up to `pos` (the channel's thread)."""
        for out in self.outputs:
            out.acknowledged(pos)

    def heartbeat(self) -> None:
        """A PROGRESS to the newest safe position (the channel's heartbeat thread)."""
        self._progress(self.safe)

    def backup_lost(self, why: str) -> None:
        if self.alone:
            return
        if not self.ended:
            logger.warning("FT: backup lost (%s): running unprotected", why)
        self.alone = True
        if self.on_alone is not None:
            self.on_alone()             # fences the backup off before any unacknowledged output goes out
        for out in self.outputs:
            out.release_all()

    # -- the vCPU thread ------------------------------------------------------------------
    def round_top(self) -> None:
        pos = position(self.engine)
        self.pos = pos
        outputs = self.outputs
        for out in outputs:
            out.pos = pos
        if self._inputs:
            self._apply(pos)
        if self._frames or self._answered:
            self._apply_virtio(pos)
        self.safe = pos
        if any(out.newest > self.sent for out in outputs):   # output waits for this round's log: send it now
            self._progress(pos)
        while not self.alone and pos[0] - self.executed > MAX_LAG_INSNS and self.machine.stop_status is None:
            time.sleep(LAG_WAIT_S)              # the backup must not fall far behind: failover time

    def finish(self) -> None:
        """The guest stopped: END to the backup."""
        if not self.alone:
            self._send(L.end(position(self.engine)))
        self.ended = True

    def _apply(self, pos: tuple[int, int]) -> None:
        with self._lock:
            pending, self._inputs = self._inputs, deque()
        while pending:
            name, data = pending.popleft()
            uart = self.machine.devices.get(name)
            if uart is None:
                continue
            room = RX_BUFFER_SIZE - len(uart.rx)   # offer only what fits: an overrun would not replay
            if room <= 0:                            # full: this and the rest wait for a later round
                pending.appendleft((name, data))
                with self._lock:
                    self._inputs.extendleft(reversed(pending))
                return
            chunk, rest = data[:room], data[room:]
            if uart.receive(chunk):                  # 0: loopback mode, the line ignores it
                self.events += 1
                self._send(L.event(L.Event(pos, L.SERIAL_RX, name, chunk)))
            if rest:
                pending.appendleft((name, rest))

    def _apply_virtio(self, pos: tuple[int, int]) -> None:
        """Disk answers and frames in, each logged before the guest can see it."""
        with self._lock:
            frames, self._frames = self._frames, deque()
            answered, self._answered = self._answered, set()

        def log(kind: int, name: str, data: bytes) -> None:
            self.events += 1
            self._send(L.event(L.Event(pos, kind, name, data)))
        with self.machine.lock:
            for drive in sorted(answered, key=lambda d: d.name):
                drive.deliver(log)
            for nic, frame in frames:
                log(L.NET_RX, nic.name, frame)
                nic.dev.deliver(frame)

    def _progress(self, pos: tuple[int, int]) -> None:
        if not self.alone:
            frames = tuple(c.released for c in self.frame_commits)
            self._send(L.progress(pos, self.commit.released, frames))
            self.sent = max(self.sent, pos)

    def _send(self, data: bytes) -> None:
        if self.alone:
            return
        try:
            self.send(data)
        except OSError as e:
            self.backup_lost(str(e) or type(e).__name__)
