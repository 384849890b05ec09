"""virtio-blk and virtio-net under FT: what reaches the guest at a host
moment (a disk answer, a frame from the network) is logged at the round
where the primary hands it over; what leaves the guest (disk work, frames
out) waits for the backup's acknowledgement.

Disks are shared: both members open the same image, and only the live one
touches it.  The primary queues a request's disk work (reads too, so that
the I/O thread's order stays the guest's) only once the backup holds the
log up to the kick: every write on the disk then comes from a kick the
backup's replay also makes, so a backup that goes live never finds a
write its own guest did not issue.  The answers go to the guest at a round
top and into the log, read data included: the backup's replay takes them
from the log, never from the image, which the primary may have changed
since.  At failover the backup queues again the disk work of every
request whose answer it has not seen; those run after the ones the
primary completed, so redoing them (all or some already done) leaves the
image as the primary's order would.

A NIC's frames from outside are logged with the round that delivers them;
its frames out are items of an ItemCommit (released in order once
acknowledged; the backup holds its own and, live, sends those the primary
did not report sent).  The backup hears nothing from its port until it is
live, then takes the port and announces the MAC (migration/announce.py)."""

from __future__ import annotations

import struct
from collections import deque

from ..devices.virtio.block import VirtioBlock
from ..devices.virtio.net import VirtioNet
from . import log as L
from .commit import HOLD, REPLAY, ItemCommit

DONE = struct.Struct(">HB")        # BLK_DONE data: chain head, status


def virtio_devices(machine) -> list[tuple[str, object]]:
    """(name, device) of the machine's virtio-blk and virtio-net, in name order."""
    found = []
    for name in sorted(machine.devices):
        inner = getattr(machine.devices[name], "device", None)
        if isinstance(inner, (VirtioBlock, VirtioNet)):
            found.append((name, inner))
    return found


class _HeldPort:
    """Stands for a NIC's port: frames out go through `commit`."""

    def __init__(self, port, commit: ItemCommit):
        self.port = port
        self.commit = commit

    def send(self, frame: bytes) -> None:
        self.commit.output(frame)

    def __getattr__(self, name):
        return getattr(self.port, name)


# -- the primary ---------------------------------------------------------------------------
class PrimaryBlock:
    """A drive of the primary: disk work after the ack, answers at round tops."""

    def __init__(self, name: str, dev: VirtioBlock, ready):
        self.name, self.dev = name, dev
        self.commit = ItemCommit(lambda index, args: dev.start_io(*args), HOLD)
        dev.submit_hook = lambda *args: self.commit.output(args)
        dev.answer_hook = lambda: ready(self)

    def deliver(self, log) -> None:
        """Round top, under the machine's lock: the answers in, each logged first."""
        def observe(chain, data: bytes, status: int) -> None:
            for at in range(0, len(data), L.EVENT_ROOM):
                log(L.BLK_DATA, self.name, data[at:at + L.EVENT_ROOM])
            log(L.BLK_DONE, self.name, DONE.pack(chain.head, status))
        self.dev.complete_answered(observe)


class PrimaryNet:
    """A NIC of the primary: frames in at round tops, frames out after the ack."""

    def __init__(self, name: str, dev: VirtioNet, incoming):
        self.name, self.dev = name, dev
        self.commit = ItemCommit(lambda index, frame: self.port.send(frame), HOLD)
        self.port = dev.port
        while isinstance(self.port, _HeldPort):     # re-protected: the old member let all its frames out
            self.port = self.port.port
        dev.port = _HeldPort(self.port, self.commit)
        dev.rx_hook = lambda frame: incoming(self, frame)


# -- the backup ----------------------------------------------------------------------------
class BackupBlock:
    """A drive of the backup: requests wait for the primary's answers in the
    log; no disk work until live."""

    def __init__(self, name: str, dev: VirtioBlock):
        self.name, self.dev = name, dev
        self.pending: deque[tuple] = deque()      # (index, queue, chain, work) in kick order
        self.data = bytearray()
        dev.submit_hook = lambda *args: self.pending.append(args)

    def apply(self, kind: int, data: bytes) -> str | None:
        """A logged answer (under the machine's lock); why it cannot be taken, or None."""
        if kind == L.BLK_DATA:
            self.data += data
            return None
        if len(data) != DONE.size:
            return "a malformed disk answer"
        head, status = DONE.unpack(data)
        if not self.pending or self.pending[0][2].head != head:
            return f"a disk answer for request {head}, which this guest has not made"
        index, queue, chain, _ = self.pending.popleft()
        answer, self.data = bytes(self.data), bytearray()
        self.dev.answer(index, queue, chain, answer, min(status, 2))
        return None

    def go_live(self) -> None:
        """The disk is ours: the requests the primary did not answer are redone."""
        self.dev.submit_hook = None
        while self.pending:
            self.dev.start_io(*self.pending.popleft())


class BackupNet:
    """A NIC of the backup: deaf and mute until live."""

    def __init__(self, name: str, dev: VirtioNet):
        self.name, self.dev = name, dev
        self.port = dev.port
        self.commit = ItemCommit(lambda index, frame: self.port.send(frame), REPLAY)
        dev.port = _HeldPort(self.port, self.commit)
        dev.rx_hook = lambda frame: None          # the primary's guest gets the network's frames

    def apply(self, kind: int, data: bytes) -> str | None:
        if kind != L.NET_RX:
            return f"{L.KINDS.get(kind, kind)} input for a NIC"
        self.dev.deliver(data)
        return None

    def go_live(self) -> None:
        self.commit.go_live()
        self.dev.rx_hook = None


def mute_nics(machine) -> None:
    """A new backup, before its log starts: frames from its port stay out of the guest."""
    with machine.lock:
        for _, dev in virtio_devices(machine):
            if isinstance(dev, VirtioNet):
                dev.rx_hook = lambda frame: None


def announce_live(machine) -> None:
    """The new live member tells the switches where the MAC is now."""
    from ..migration.announce import announce_in_background
    announce_in_background(machine)


def held_item_commits(members) -> list[ItemCommit]:
    """The frame commits whose released counts PROGRESS carries, in name order."""
    return [m.commit for m in members if isinstance(m, (PrimaryNet, BackupNet))]


__all__ = ["PrimaryBlock", "PrimaryNet", "BackupBlock", "BackupNet", "virtio_devices", "mute_nics", "announce_live",
           "held_item_commits"]
