"""Output commit: console bytes reach the outside only once the backup holds
the log that produced them, so nothing the outside saw is lost at failover.

Every byte the guest writes has an offset in the console stream (the same
on primary and backup, since both run the same guest).  The primary holds
each write with the guest position of the round that made it and releases
it when the backup acknowledges a log PROGRESS at or past that position.
The backup holds what its replay writes, drops what the primary reported
released, and at failover writes out the rest: a writer that puts bytes at
their offset (console_file_writer) then sees every byte exactly once."""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Callable

Writer = Callable[[int, bytes], None]     # (stream offset, bytes) -> the outside

HOLD, REPLAY, LIVE = "hold", "replay", "live"


def stream_writer(write: Callable[[bytes], None]) -> Writer:
    """A writer for a plain stream (stdout): the offset is not needed."""
    return lambda offset, data: write(data)


def console_file_writer(path: str, truncate: bool) -> tuple[Writer, Callable[[], None]]:
    """A writer that puts each byte at its offset in `path` (so two FT
    members writing the same bytes leave one copy), and its closer.
    Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0), 0o644)
    return (lambda offset, data: os.pwrite(fd, data, offset)), (lambda: os.close(fd))


class _HeldOutputs:
    """What OutputCommit and ItemCommit share: outputs held with the guest
    position of the round that made them, let out (`_emit`, the subclass's)
    once the backup acknowledged that position."""

    def __init__(self, write, mode: str = HOLD):
        self.write = write
        self.mode = mode
        self.pos = (0, 0)
        self.released = 0         # what reached the outside (bytes or items)
        self.newest = (-1, -1)    # position of the newest held output
        self._held: deque[tuple[tuple[int, int], int, object]] = deque()
        self._lock = threading.Lock()

    def _hold(self, key: int, payload) -> None:
        """Under _lock: lets `payload` out now when live, else holds it."""
        if self.mode == LIVE:
            self._emit(key, payload)
            return
        self._held.append((self.pos, key, payload))
        self.newest = self.pos

    def acknowledged(self, pos: tuple[int, int]) -> None:
        """Primary: the backup holds the log up to `pos`; what was made in
        rounds at or before it goes out."""
        with self._lock:
            while self._held and self._held[0][0] <= pos:
                _, key, payload = self._held.popleft()
                self._emit(key, payload)

    def release_all(self) -> None:
        """Primary without a backup: everything goes out, and from now on at once."""
        with self._lock:
            while self._held:
                _, key, payload = self._held.popleft()
                self._emit(key, payload)
            self.mode = LIVE

    def _emit(self, key: int, payload) -> None:
        raise NotImplementedError


class OutputCommit(_HeldOutputs):
    """One console stream's held output. output() runs on the vCPU thread,
    acknowledged() on the channel's; `pos` is the guest position of the
    round running now (set by the recorder or replayer at each round)."""

    def __init__(self, write: Writer, mode: str = HOLD):
        super().__init__(write, mode)
        self.offset = 0           # bytes the guest has written

    def __repr__(self) -> str:
        return f"OutputCommit({self.mode}, offset={self.offset}, released={self.released}, held={len(self._held)})"

    def output(self, data: bytes) -> None:
        with self._lock:
            offset = self.offset
            self.offset += len(data)
            self._hold(offset, data)

    def trim(self, released: int) -> None:
        """Backup: the primary reported `released` bytes out; they need not be kept."""
        with self._lock:
            self.released = max(self.released, released)
            while self._held and self._held[0][1] + len(self._held[0][2]) <= self.released:
                self._held.popleft()

    def go_live(self) -> None:
        """Backup at failover: writes what the primary may not have released, then goes direct."""
        with self._lock:
            while self._held:
                _, offset, data = self._held.popleft()
                skip = max(0, self.released - offset)
                if skip < len(data):
                    self._emit(offset + skip, data[skip:])
            self.mode = LIVE

    @property
    def held_bytes(self) -> int:
        return sum(len(d) for _, _, d in self._held)

    def _emit(self, offset: int, data: bytes) -> None:
        self.write(offset, data)
        self.released = max(self.released, offset + len(data))


class ItemCommit(_HeldOutputs):
    """Held outputs that are whole items (frames out of a NIC, disk work of
    a drive) rather than bytes: the n-th item the guest made is n on both
    members, so `released` counts items.  Same calls as OutputCommit;
    `write(index, item)` lets one out."""

    def __init__(self, write: Callable[[int, object], None], mode: str = HOLD):
        super().__init__(write, mode)
        self.count = 0            # items the guest has made

    def __repr__(self) -> str:
        return f"ItemCommit({self.mode}, count={self.count}, released={self.released}, held={len(self._held)})"

    def output(self, item) -> None:
        with self._lock:
            index = self.count
            self.count += 1
            self._hold(index, item)

    def trim(self, released: int) -> None:
        """Backup: the primary let `released` items out; they need not be kept."""
        with self._lock:
            self.released = max(self.released, released)
            while self._held and self._held[0][1] < self.released:
                self._held.popleft()

    def go_live(self) -> None:
        """Backup at failover: lets out what the primary may not have, then goes direct."""
        self.release_all()

    def _emit(self, index: int, item) -> None:
        self.write(index, item)
        self.released = max(self.released, index + 1)
