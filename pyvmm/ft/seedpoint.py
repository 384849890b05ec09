"""The live member's virtio disks and NICs held still while it seeds a new
backup (reprotect.py), so that its state holds nothing in flight.

At the seed point the vCPUs wait in a round top, so the guest makes no new
requests; what still moves comes from the host: disk work on the I/O
threads and frames from the network on the event loop.  hold() completes
every disk request submitted so far into guest memory and the used ring
(the migration state then carries the answers, and the image, flushed by
the migration, holds the writes), and keeps the frames that arrive from
then on out of the guest.  Frames the device held for want of receive
buffers are taken out too: the migration state leaves them behind, so the
new backup's device would lack them.  Once the new primary's recorder is
attached, release() hands all those frames to it, in arrival order: they
reach the guest at a logged round like any frame from the network.  A
seed that fails gives them back to the device with abandon()."""

from __future__ import annotations

import threading
from collections import deque

from ..errors import StateError
from . import virtio as V

SETTLE_S = 5.0


class SeedPoint:
    """Holds `machine`'s virtio devices still; `old` is the recorder in use
    until the seed (its queued frames belong to the held ones)."""

    def __init__(self, machine, old):
        self.machine = machine
        self.old = old
        devices = V.virtio_devices(machine)
        self.blocks = [(n, d) for n, d in devices if isinstance(d, V.VirtioBlock)]
        self.nets = [(n, d) for n, d in devices if isinstance(d, V.VirtioNet)]
        self.frames: dict[str, list[bytes]] = {name: [] for name, _ in self.nets}
        self._hooks: dict[str, tuple] = {}

    def __repr__(self) -> str:
        return f"SeedPoint(disks={len(self.blocks)}, held frames={sum(map(len, self.frames.values()))})"

    def hold(self) -> None:
        """On the vCPU thread, at a round top. Raises StateError when the disk
        work or the event loop does not settle (then call abandon())."""
        m = self.machine
        with m.lock:        # the event loop hands frames over under it: none comes meanwhile
            queued = getattr(self.old, "_frames", None)     # frames the old recorder has not delivered
            if queued:
                with self.old._lock:
                    queued, self.old._frames = self.old._frames, deque()
            for name, dev in self.nets:
                self._hooks[name] = (dev.rx_hook,)
                self.frames[name].extend(dev.backlog)       # the oldest: in the device already
                dev.backlog.clear()
                self.frames[name].extend(frame for nic, frame in queued or () if nic.name == name)
                dev.rx_hook = self.frames[name].append
        for name, dev in self.blocks:
            self._hooks[name] = (dev.submit_hook, dev.answer_hook)
            dev.submit_hook = dev.answer_hook = None    # as a device without FT: drain() finishes it all
            dev.drain()
        self._settle_loop()

    def release(self, recorder) -> None:
        """Under the machine's lock, right after the new recorder was attached:
        the held frames go to it, to be delivered and logged at its next round."""
        for member in recorder.virtio:
            if isinstance(member, V.PrimaryNet):
                for frame in self.frames.pop(member.name, []):
                    recorder.frame_in(member, frame)

    def abandon(self) -> None:
        """The seed failed: the devices work as before, the held frames go in."""
        with self.machine.lock:
            for name, dev in self.blocks:
                if name in self._hooks:
                    dev.submit_hook, dev.answer_hook = self._hooks[name]
            for name, dev in self.nets:
                if name in self._hooks:
                    (dev.rx_hook,) = self._hooks[name]
                for frame in self.frames.pop(name, []):
                    dev.receive(frame)

    def _settle_loop(self) -> None:
        """Waits for the event loop to run what was posted to it before now
        (a disk answer's completion among them), so none of it runs later,
        after the new recorder took over the devices."""
        loop = self.machine.loop
        if not loop.running:
            return
        done = threading.Event()
        loop.call_soon_threadsafe(done.set)
        if not done.wait(SETTLE_S):
            raise StateError(f"the event loop did not settle in {SETTLE_S:.0f} s")
