"""The machine's one event loop: console input, timers, and (later) API
sockets, TAP devices and disk completions, instead of a thread per device.

One thread waits on file descriptors and timers and runs each callback
under the machine's lock, so the devices those callbacks touch need no
locks of their own (Firecracker's event manager and kvmtool's epoll thread
work this way).  Any thread may add readers or timers or post a callback
with call_soon_threadsafe: a pipe wakes the loop.

A callback that raises is logged and dropped; the loop goes on."""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class TimerHandle:
    """A call_later callback; cancel() keeps it from running."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __repr__(self) -> str:
        return f"TimerHandle(in {self.when - time.monotonic():.3f} s, cancelled={self.cancelled})"


class EventLoop:
    """One thread of callbacks under `lock` (the machine's). start() runs
    it, stop() ends it (callable from a callback too). Raises OSError from
    the constructor when the wake-up pipe cannot be made."""

    def __init__(self, lock: threading.RLock | None = None, name: str = "pyvmm-events"):
        self.lock = lock or threading.RLock()
        self.name = name
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._mutex = threading.Lock()          # guards the structures below, never held in a callback
        self._readers: dict[int, Callable[[], None]] = {}
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._soon: list[Callable[[], None]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.callbacks_run = 0
        self.errors = 0

    def __repr__(self) -> str:
        return (f"EventLoop({self.name}, readers={len(self._readers)}, timers={len(self._timers)}, "
                f"{'running' if self.running else 'stopped'})")

    # -- what to wait for (any thread) ----------------------------------------
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Calls callback() whenever fd is readable, until remove_reader(fd)."""
        with self._mutex:
            if fd in self._readers:
                self._sel.modify(fd, selectors.EVENT_READ, fd)
            else:
                self._sel.register(fd, selectors.EVENT_READ, fd)
            self._readers[fd] = callback
        self._wake()

    def remove_reader(self, fd: int) -> bool:
        """Stops watching fd; False when it was not watched."""
        with self._mutex:
            if self._readers.pop(fd, None) is None:
                return False
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        self._wake()
        return True

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Runs callback() once, `delay` seconds from now."""
        handle = TimerHandle(time.monotonic() + max(0.0, delay), callback)
        with self._mutex:
            heapq.heappush(self._timers, (handle.when, next(self._seq), handle))
        self._wake()
        return handle

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Runs callback() on the loop's thread as soon as it can."""
        with self._mutex:
            self._soon.append(callback)
        self._wake()

    # -- running --------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Ends the loop (what is pending does not run) and waits for its
        thread, unless called from it. Idempotent."""
        self._stopping = True
        self._wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self._thread = None

    def close(self) -> None:
        """stop(), then releases the selector and the pipe."""
        self.stop()
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass    # a full pipe wakes the loop as well; a closed one has no loop to wake

    def _run(self) -> None:
        while not self._stopping:
            with self._mutex:
                timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None
                if self._soon:
                    timeout = 0.0
            try:
                events = self._sel.select(timeout)
            except (OSError, ValueError):
                if self._stopping:
                    return
                raise
            due: list[Callable[[], None]] = []
            with self._mutex:
                for key, _ in events:
                    if key.data is None:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                    elif key.data in self._readers:
                        due.append(self._readers[key.data])
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    handle = heapq.heappop(self._timers)[2]
                    if not handle.cancelled:
                        due.append(handle.callback)
                due.extend(self._soon)
                self._soon.clear()
            for callback in due:
                if self._stopping:
                    return
                with self.lock:
                    try:
                        callback()
                    except Exception:
                        self.errors += 1
                        log.exception("event loop callback %r failed", callback)
                self.callbacks_run += 1
