"""ft/seedpoint.py on real virtio devices (no guest runs): at a seed point a
disk request in flight is completed into the used ring before the state is
taken, and the frames not yet in the guest (the device's backlog, the old
recorder's queue, those arriving during the seed) are kept, in order, for
the new primary's recorder, or given back when the seed fails."""

from __future__ import annotations

import threading
from collections import deque
from types import SimpleNamespace

from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.ft.seedpoint import SeedPoint
from pyvmm.ft.virtio import PrimaryBlock, PrimaryNet
from pyvmm.loop import EventLoop
from pyvmm.memory import GuestMemory

from .test_virtio_members import FakePort, _drive, _wait, _write

MAC = bytes.fromhex("02a000000001")


class FakeRecorder:
    """What SeedPoint uses of a Recorder: its frame queue, its members, frame_in."""

    def __init__(self, virtio=()):
        self._frames: deque = deque()
        self._lock = threading.Lock()
        self.virtio = list(virtio)
        self.given: list[tuple[str, bytes]] = []

    def frame_in(self, nic, frame: bytes) -> None:
        self.given.append((nic.name, frame))


def _machine(tmp_path):
    d, path, io = _drive(tmp_path, "s")
    port = FakePort()
    nic = VirtioNet(GuestMemory(1 << 20), port, MAC)
    lock = threading.RLock()
    loop = EventLoop(lock)
    loop.start()
    machine = SimpleNamespace(devices={"virtio_blk0": SimpleNamespace(device=d.device),
                                       "virtio_net0": SimpleNamespace(device=nic)}, lock=lock, loop=loop)
    return machine, d, io, nic, port


def test_seed_point_completes_disk_work_and_keeps_frames_for_the_new_recorder(tmp_path):
    machine, d, io, nic, port = _machine(tmp_path)
    try:
        answered = []
        drive = PrimaryBlock("virtio_blk0", d.device, answered.append)
        drive.commit.release_all()               # a primary running alone: disk work at once
        old_nic = PrimaryNet("virtio_net0", nic, lambda member, frame: old._frames.append((member, frame)))
        old = FakeRecorder([drive, old_nic])
        nic.deliver(b"backlog")                  # no receive buffers posted: held by the device
        port.callback(b"queued")                 # for the old recorder's next round
        _write(d, 2, 0xCD)
        _wait(lambda: answered, "the disk answer")
        assert d.used() == [] and d.device.in_flight == 1     # answered, not yet in the guest

        point = SeedPoint(machine, old)
        point.hold()
        assert d.device.in_flight == 0 and d.used() == [(0, 1)]   # in the ring before the state is taken
        assert not nic.backlog and not old._frames
        port.callback(b"during")                 # arrives while the state is sent: held
        assert not nic.backlog

        new = FakeRecorder()
        new.virtio = [PrimaryNet("virtio_net0", nic, new.frame_in)]
        assert new.virtio[0].port is port        # not behind the old member's held port
        point.release(new)
        assert new.given == [("virtio_net0", b"backlog"), ("virtio_net0", b"queued"),
                             ("virtio_net0", b"during")]
    finally:
        machine.loop.close()
        io.stop()


def test_a_failed_seed_gives_the_frames_back(tmp_path):
    machine, d, io, nic, port = _machine(tmp_path)
    try:
        point = SeedPoint(machine, FakeRecorder())
        nic.deliver(b"first")
        point.hold()
        port.callback(b"second")
        assert not nic.backlog
        point.abandon()
        assert list(nic.backlog) == [b"first", b"second"]
        port.callback(b"third")                  # the device hears its port again
        assert list(nic.backlog) == [b"first", b"second", b"third"]
    finally:
        machine.loop.close()
        io.stop()
