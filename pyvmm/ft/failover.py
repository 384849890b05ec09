"""Exactly one live FT member: an exclusive lock on shared storage.

The primary takes the lock when it starts and holds it while it lives (the
kernel drops it when the process dies, kill -9 included).  A backup that
lost its primary goes live only once it holds the lock; a primary that is
alive but cut off keeps it, so the backup then stops instead of splitting
the VM in two.  The lock file sits next to the first disk image, or next
to the logging channel's socket, unless --ft-lock names one.

The file's text is a fencing mark: a primary that loses its backup writes
ALONE there before it lets out any output the backup has not acknowledged,
so a backup that gets the lock later (the primary died after running on
alone) finds its log stale and does not go live."""

from __future__ import annotations

import fcntl
import os
import tempfile
import time

from ..errors import ConfigError

LOCK_WAIT_S = 0.3     # a killed primary's lock goes as its process exits, with its socket
PRIMARY, ALONE = b"primary\n", b"alone\n"


class FtLock:
    """An flock(2) on `path`, created when missing."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"FtLock({self.path!r}, {'held' if self.held else 'free'})"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Raises ConfigError when the lock file cannot be opened."""
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"--ft lock {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def acquire(self, wait_s: float = LOCK_WAIT_S) -> bool:
        deadline = time.monotonic() + wait_s
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def mark(self, text: bytes) -> None:
        """Holder only: replaces the file's text (synced: the next holder must see it)."""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text, 0)
        os.fsync(self._fd)

    def text(self) -> bytes:
        return os.pread(self._fd, 64, 0) if self._fd is not None else b""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)      # closing drops the flock
            self._fd = None


def default_lock_path(cfg, channel: str) -> str:
    """Next to the first disk image, else next to the channel's socket."""
    if cfg.drives:
        return cfg.drives[0].file + ".ftlock"
    kind, _, rest = channel.partition(":")
    if kind == "unix" and rest:
        return rest + ".ftlock"
    safe = "".join(ch if ch.isalnum() else "-" for ch in rest)
    return os.path.join(tempfile.gettempdir(), f"pyvmm-ft-{safe}.ftlock")
