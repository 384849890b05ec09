"""virtio-blk with an I/O thread: the kick returns before the disk work is
done, the answers complete on the machine's event loop, a FLUSH runs after
the writes before it, and drain/reset/pause see no half-done request."""

from __future__ import annotations

import threading
import time

import pytest

from pyvmm.bus import Bus
from pyvmm.config import VmConfig
from pyvmm.devices.virtio import block
from pyvmm.devices.virtio.block import HEADER, VirtioBlock
from pyvmm.devices.virtio.iothread import IoThread
from pyvmm.loop import EventLoop
from pyvmm.machine import Machine
from pyvmm.memory import GuestMemory
from pyvmm.runstate import RunState
from pyvmm.storage import open_image

from .virtio_driver import DRIVER_OK, Driver

DISK = 1 << 20
WAIT_S = 10.0


class GatedImage:
    """A disk image whose reads wait for `gate`; records each operation
    and the thread that ran it."""

    def __init__(self, image):
        self._image = image
        self.gate = threading.Event()
        self.ops: list[tuple[str, str]] = []

    def __getattr__(self, name):
        return getattr(self._image, name)

    def read(self, offset: int, length: int) -> bytes:
        self.ops.append(("read", threading.current_thread().name))
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        return self._image.read(offset, length)

    def write(self, offset: int, data) -> None:
        self.ops.append(("write", threading.current_thread().name))
        self._image.write(offset, data)

    def flush(self) -> None:
        self.ops.append(("flush", threading.current_thread().name))
        self._image.flush()


@pytest.fixture
def rig(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(range(256)) * (DISK // 256))
    image = GatedImage(open_image(str(path), "raw"))
    lock = threading.RLock()
    loop = EventLoop(lock, name="test-loop")
    completed_on: list[str] = []
    io = IoThread("test-io")

    def make(mem):
        dev = VirtioBlock(mem, image, serial="s")
        dev.use_io_thread(io, loop.call_soon_threadsafe, lock)
        return dev

    d = Driver(make, 0x018000)
    d.fn.INPUT_FROM_LOOP = True
    notify = d.fn.notify

    def wake(index: int) -> None:
        completed_on.append(threading.current_thread().name)
        notify(index)

    d.device.wake = wake
    assert d.init() & DRIVER_OK
    loop.start()
    yield d, image, loop, lock, completed_on
    image.gate.set()
    loop.close()
    io.stop()
    image._image.close()


def read_request(d, sector=0, length=512):
    return d.submit([(HEADER.pack(block.T_IN, 0, sector), False), (length, True), (1, True)])


def wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_the_kick_returns_before_the_disk_read_is_done(rig):
    d, image, loop, _, completed_on = rig
    placed = read_request(d, sector=1)              # submit() kicks: returns with the read blocked
    wait_for(lambda: image.ops, "the read to start")
    assert image.ops == [("read", "test-io")]        # on the I/O thread, not the kicking one
    assert d.used() == [] and d.irq.level == 0 and d.device.in_flight == 1
    image.gate.set()
    wait_for(lambda: d.used(), "the completion")
    assert d.used() == [(0, 513)]
    assert d.memory.read(placed[1][0], 512) == bytes(range(256)) * 2
    assert d.memory.read_u8(placed[2][0]) == block.S_OK
    assert completed_on == ["test-loop"]              # completed by the event loop
    wait_for(lambda: d.irq.level == 1, "the interrupt")
    assert d.device.in_flight == 0


def test_flush_runs_after_the_writes_before_it(rig):
    d, image, _, _, _ = rig
    read_request(d)                                   # holds the I/O thread at the gate
    d.submit([(HEADER.pack(block.T_OUT, 0, 4), False), (b"\xAA" * 512, False), (1, True)])
    flush = d.submit([(HEADER.pack(block.T_FLUSH, 0, 0), False), (1, True)])
    time.sleep(0.05)
    assert [op for op, _ in image.ops] == ["read"] and d.used() == []
    image.gate.set()
    wait_for(lambda: len(d.used()) == 3, "three completions")
    assert [op for op, _ in image.ops] == ["read", "write", "flush"]
    assert [head for head, _ in d.used()] == [0, 3, 6]   # completed in submission order
    assert d.memory.read_u8(flush[-1][0]) == block.S_OK


def test_drain_waits_for_the_request_in_flight(rig):
    d, image, _, _, _ = rig
    read_request(d)
    wait_for(lambda: image.ops, "the read to start")
    threading.Timer(0.2, image.gate.set).start()
    start = time.monotonic()
    d.device.drain()
    assert time.monotonic() - start >= 0.15
    assert d.used() == [(0, 513)] and d.device.in_flight == 0


def test_reset_drops_the_answer_of_a_request_in_flight(rig):
    d, image, _, lock, _ = rig
    read_request(d)
    wait_for(lambda: image.ops, "the read to start")
    threading.Timer(0.1, image.gate.set).start()
    with lock:
        d.common_write(0x14, 1, 0)                    # device_status = 0: reset
    time.sleep(0.1)
    assert d.used() == [] and d.device.in_flight == 0


class StubEngine:
    paused = False

    def pause(self) -> bool:
        self.paused = True
        return True

    def resume(self) -> None:
        self.paused = False


def test_machine_pause_drains_the_disks(rig):
    d, image, _, lock, _ = rig
    machine = Machine(VmConfig(), GuestMemory(1 << 20), Bus("io"), Bus("mmio"), lock)
    machine.engine, machine.state = StubEngine(), RunState.RUNNING
    machine.drains.append(d.device.drain)
    read_request(d)
    wait_for(lambda: image.ops, "the read to start")
    threading.Timer(0.2, image.gate.set).start()
    machine.pause()
    assert machine.state is RunState.PAUSED and d.used() == [(0, 513)]
    state = d.fn.save()
    assert state["queues"][0]["vq"]["used_idx"] == state["queues"][0]["vq"]["last_avail"] == 1
    machine.memory.close()
