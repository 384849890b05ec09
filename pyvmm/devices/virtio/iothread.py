"""A drive's I/O thread: runs the disk work of virtio requests in the order
they were submitted, off the vCPU thread that kicked the queue.

The jobs write only the disk image, never guest memory or the queue (a
write job reads the guest's buffers in place, which the driver leaves
alone until the request completes), and take no machine lock: the device
posts each result to the machine's event loop, which completes the
request under the lock (block.py).  One thread per drive keeps a FLUSH
behind every write submitted before it, which is what virtio-blk's flush
promises (virtio 1.2, 5.2.6)."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class IoThread:
    """A FIFO of jobs and the one thread that runs them.  A job that raises
    is logged and counted; the thread goes on."""

    def __init__(self, name: str):
        self.name = name
        self._cond = threading.Condition()
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._busy = False            # a job is running now
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.jobs_run = 0
        self.errors = 0

    def __repr__(self) -> str:
        return f"IoThread({self.name}, queued={len(self._jobs)}, busy={self._busy}, run={self.jobs_run})"

    def submit(self, job: Callable[[], None]) -> None:
        """Queues `job` behind the ones already submitted. Any thread."""
        with self._cond:
            if self._stopping:
                raise RuntimeError(f"{self.name}: stopped")
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._jobs and not self._busy

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Waits until every submitted job has run; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def barrier(self, timeout: float | None = None) -> bool:
        """Waits until the jobs submitted before this call have run (later
        ones may still be queued, so a busy guest cannot hold it up); False
        on timeout."""
        with self._cond:
            target = self.jobs_run + len(self._jobs) + (1 if self._busy else 0)
            return self._cond.wait_for(lambda: self.jobs_run >= target, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Runs what was submitted, then ends the thread. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._stopping)
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._busy = True
            try:
                job()
            except Exception:
                self.errors += 1
                log.exception("%s: job %r failed", self.name, job)
            finally:
                with self._cond:
                    self._busy = False
                    self.jobs_run += 1
                    self._cond.notify_all()
