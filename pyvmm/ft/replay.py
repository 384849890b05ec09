"""The backup's side: the same guest, run up to the primary's log and no
further, with every logged input applied at the position the primary
applied it.  Outputs are held (commit.py), never sent, while replaying.

round_top() runs before every scheduler round.  It applies the events
logged for this position, then lets the round run if the primary is known
to have passed this position (a PROGRESS at or past it, or an event after
it), or the primary's guest has ended.  Otherwise it waits for the log.
Once the primary is lost and every logged event has been applied, the
backup goes live (`on_live`, failover.py): what the primary did after its
last event was this same deterministic run, so the backup continues it.

Rounds at one position can repeat only while nothing runs (every vCPU
halted, no timer armed), when the guest state does not change, so an
input logged at a later such round is the same input at the same state."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

from ..errors import VmmError
from ..machine import StopReason
from . import log as L
from .commit import OutputCommit
from .record import position

logger = logging.getLogger(__name__)

WAIT_S = 0.05


class ReplayDiverged(VmmError):
    """The backup's guest left the primary's path (a logged input it cannot take)."""


class Replayer:
    """Feeds a backup machine the primary's log. The add_* and primary_lost
    calls come from the channel's thread; round_top from the vCPU thread."""

    def __init__(self, machine, commit: OutputCommit, on_live: Callable[[], None] | None = None):
        self.machine = machine
        self.engine = machine.engine
        self.commit = commit
        self.on_live = on_live
        self.pos = (0, 0)
        self.progress = (-1, -1)
        self.ended: tuple[int, int] | None = None
        self.lost = False
        self.live = False
        self.applied = 0
        self.virtio: dict = {}              # name -> ft/virtio.py's BackupBlock/BackupNet
        self.frame_commits: list = []       # the NICs' held frames, trimmed by PROGRESS
        self._events: deque[L.Event] = deque()
        self._cond = threading.Condition()

    def __repr__(self) -> str:
        return (f"Replayer(pos={self.pos}, progress={self.progress}, queued={len(self._events)}, "
                f"applied={self.applied}, lost={self.lost}, live={self.live})")

    # -- the channel's thread ---------------------------------------------------------
    def add_event(self, ev: L.Event) -> None:
        with self._cond:
            self._events.append(ev)
            self._cond.notify()
        self.engine.sched._wake.set()

    def add_progress(self, pos: tuple[int, int], released: int, frames: list[int] = ()) -> None:
        with self._cond:
            self.progress = max(self.progress, pos)
            self._cond.notify()
        self.commit.trim(released)
        for commit, sent in zip(self.frame_commits, frames):
            commit.trim(sent)
        self.engine.sched._wake.set()

    def add_end(self, pos: tuple[int, int]) -> None:
        with self._cond:
            self.ended = pos
            self._cond.notify()
        self.engine.sched._wake.set()

    def primary_lost(self, why: str) -> None:
        with self._cond:
            if self.ended is None and not self.lost:
                logger.warning("FT: primary lost (%s)", why)
                self.lost = True
            self._cond.notify()
        self.engine.sched._wake.set()

    # -- the vCPU thread --------------------------------------------------------------------
    def round_top(self) -> None:
        """Raises ReplayDiverged."""
        pos = position(self.engine)
        self.pos = self.commit.pos = pos
        m = self.machine
        with self._cond:
            while True:
                events = self._events
                while events and events[0].pos == pos:
                    self._apply(events.popleft())
                if events and events[0].pos < pos:
                    raise ReplayDiverged(f"FT replay diverged: an input logged at {events[0].pos} "
                                         f"and the backup already at {pos}")
                if self.ended is not None:
                    if pos >= self.ended and m.stop_status is None:
                        m.request_stop(StopReason.USER, "FT primary stopped")
                    return
                if self.lost and not events:      # the whole log is in: carry on from here, live
                    break
                if events or self.progress >= pos or m.stop_status is not None:
                    return
                self._cond.wait(WAIT_S)
        self.live = True
        if self.on_live is not None:
            self.on_live()

    def _apply(self, ev: L.Event) -> None:
        member = self.virtio.get(ev.name)
        if member is not None and ev.kind != L.SERIAL_RX:
            with self.machine.lock:
                why = member.apply(ev.kind, ev.data)
            if why is not None:
                raise ReplayDiverged(f"FT replay diverged at {ev.pos}: {ev.name} got {why}")
            self.applied += 1
            return
        uart = self.machine.devices.get(ev.name)
        if ev.kind != L.SERIAL_RX or uart is None:
            raise ReplayDiverged(f"FT replay: the log names {L.KINDS.get(ev.kind, ev.kind)} "
                                 f"input for {ev.name!r}, which this VM lacks")
        taken = uart.receive(ev.data)
        if taken != len(ev.data):
            raise ReplayDiverged(f"FT replay diverged at {ev.pos}: {ev.name} took {taken} of {len(ev.data)} bytes")
        self.applied += 1
