"""ft/virtio.py on real virtio-blk devices driven by the test driver (no
guest runs): the primary queues disk work only once the backup
acknowledged the kick, its answers reach the guest only when the recorder
delivers them (logged first); a backup answers from the log without
touching its image and, going live, redoes the requests left unanswered."""

from __future__ import annotations

import threading
import time

import pytest

from pyvmm.devices.virtio import block
from pyvmm.devices.virtio.block import HEADER, VirtioBlock
from pyvmm.devices.virtio.iothread import IoThread
from pyvmm.ft import log as L
from pyvmm.ft.commit import ItemCommit
from pyvmm.ft.virtio import BackupBlock, PrimaryBlock
from pyvmm.storage import open_image

from tests.devices.virtio_driver import DRIVER_OK, Driver

DISK = 64 * 1024
WAIT_S = 10.0


class Untouchable:
    """An image a backup must not use while it replays."""

    def __init__(self, image):
        self._image = image
        self.armed = True

    def __getattr__(self, name):
        if self.armed and name in ("read", "write", "flush", "discard", "write_zeroes"):
            raise AssertionError(f"the backup used its image ({name}) while replaying")
        return getattr(self._image, name)


def _drive(tmp_path, name: str, wrap=lambda image: image):
    path = tmp_path / f"{name}.raw"
    path.write_bytes(bytes(DISK))
    image = wrap(open_image(str(path), "raw"))
    io = IoThread(f"test-io-{name}")
    lock = threading.RLock()

    def make(mem):
        dev = VirtioBlock(mem, image, serial=name)
        dev.use_io_thread(io, lambda cb: cb(), lock)
        return dev

    d = Driver(make, 0x018000)
    d.device.wake = d.fn.notify
    assert d.init() & DRIVER_OK
    return d, path, io


def _wait(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _write(d, sector: int, fill: int):
    return d.submit([(HEADER.pack(block.T_OUT, 0, sector), False), (bytes([fill]) * 512, False), (1, True)])


def _read(d, sector: int):
    return d.submit([(HEADER.pack(block.T_IN, 0, sector), False), (512, True), (1, True)])


@pytest.fixture
def primary(tmp_path):
    d, path, io = _drive(tmp_path, "p")
    answered = []
    member = PrimaryBlock("virtio_blk0", d.device, answered.append)
    yield d, path, member, answered
    io.stop()


def test_the_primary_writes_only_what_the_backup_acknowledged(primary):
    d, path, member, answered = primary
    member.commit.pos = (100, 7)              # the round the kick happens in
    _write(d, 3, 0xAB)
    time.sleep(0.05)
    assert path.read_bytes()[3 * 512] == 0 and not answered    # held: the backup has not the log yet
    member.commit.acknowledged((99, 9))
    time.sleep(0.05)
    assert path.read_bytes()[3 * 512] == 0
    member.commit.acknowledged((100, 7))
    _wait(lambda: answered, "the disk answer")
    assert path.read_bytes()[3 * 512:4 * 512] == b"\xAB" * 512
    assert d.used() == []                     # answered, but the guest sees it only at a round top
    logged = []
    member.deliver(lambda kind, name, data: logged.append((kind, name, data)))
    assert d.used() == [(0, 1)]
    assert logged == [(L.BLK_DONE, "virtio_blk0", b"\x00\x00\x00")]     # head 0, S_OK


def test_a_backup_replays_the_primary_answers_and_redoes_the_rest_live(primary, tmp_path, monkeypatch):
    d, path, member, _ = primary
    member.commit.release_all()               # no waiting for acks here: the log is what counts
    logged = []
    _write(d, 5, 0x5A)
    reads = [_read(d, 5), _read(d, 6)]
    _wait(lambda: len(d.device._done) == 3, "three answers")
    member.deliver(lambda kind, name, data: logged.append((kind, data)))
    assert [k for k, _ in logged] == [L.BLK_DONE, L.BLK_DATA, L.BLK_DONE, L.BLK_DATA, L.BLK_DONE]

    monkeypatch.setattr(L, "EVENT_ROOM", 200)            # a read's data in pieces, as large answers go
    logged.clear()
    d.device.wake = d.fn.notify
    _read(d, 5)
    _wait(lambda: len(d.device._done) == 1, "the fourth answer")
    member.deliver(lambda kind, name, data: logged.append((kind, data)))
    assert [k for k, _ in logged] == [L.BLK_DATA] * 3 + [L.BLK_DONE]

    bd, bpath, bio = _drive(tmp_path, "b", Untouchable)
    try:
        backup = BackupBlock("virtio_blk0", bd.device)
        _write(bd, 5, 0x5A)
        breads = [_read(bd, 5), _read(bd, 6), _read(bd, 5)]
        assert len(backup.pending) == 4 and bd.used() == []
        # the primary's first three answers, then the fourth one's pieces
        full_log = [(L.BLK_DONE, b"\0\0\0")]
        primary_answers = [(d.memory.read(reads[0][1][0], 512), 3), (d.memory.read(reads[1][1][0], 512), 6)]
        for data, head in primary_answers:
            full_log += [(L.BLK_DATA, data), (L.BLK_DONE, bytes([0, head, 0]))]
        for kind, data in full_log:
            assert backup.apply(kind, data) is None
        assert bd.used() == [(0, 1), (3, 513), (6, 513)]
        assert bd.memory.read(breads[0][1][0], 512) == b"\x5A" * 512
        assert bd.memory.read(breads[1][1][0], 512) == bytes(512)
        assert "not made" in backup.apply(L.BLK_DONE, bytes([0, 3, 0]))       # the next one is head 9
        assert bpath.read_bytes()[5 * 512] == 0   # the backup wrote nothing

        bd.device.image.armed = False             # live: the disk is the backup's now
        backup.go_live()
        _wait(lambda: len(bd.used()) == 4, "the redone read")
        assert bd.memory.read(breads[2][1][0], 512) == bytes(512)    # from its own image
    finally:
        bio.stop()


def test_item_commit_counts_items_and_a_backup_sends_what_the_primary_did_not():
    sent = []
    commit = ItemCommit(lambda index, item: sent.append((index, item)))
    for i, pos in enumerate([(1, 1), (2, 2), (3, 3)]):
        commit.pos = pos
        commit.output(f"frame{i}")
    commit.acknowledged((2, 2))
    assert sent == [(0, "frame0"), (1, "frame1")] and commit.released == 2
    backup_sent = []
    backup = ItemCommit(lambda index, item: backup_sent.append(index), mode="replay")
    for i in range(3):
        backup.output(f"frame{i}")
    backup.trim(commit.released)
    backup.go_live()
    backup.output("frame3")
    assert backup_sent == [2, 3]


def test_progress_carries_the_frame_counts():
    kind, body = L.read_record(_reader(L.progress((5, 6), 77, (3, 9))))
    assert kind == L.PROGRESS
    assert L.parse_progress(body) == ((5, 6), 77) and L.parse_progress_items(body) == [3, 9]
    with pytest.raises(L.LogError):
        L.parse_progress_items(body + b"\1")


def _reader(data: bytes):
    pos = [0]

    def read(n: int) -> bytes:
        chunk = data[pos[0]:pos[0] + n]
        pos[0] += len(chunk)
        return chunk
    return read


def test_ft_takes_raw_disks_and_nics_but_not_a_qcow2_disk_or_a_switch_nic_without_mac():
    from pyvmm.config import DriveConfig, NetConfig, VmConfig
    from pyvmm.errors import ConfigError
    from pyvmm.ft.setup import ft_config
    nic = NetConfig(switch="ftv", mac="02:a0:00:00:00:01")
    cfg = VmConfig(kernel="k", engine="bt", drives=[DriveConfig(file="d.raw", format="raw")], nets=[nic])
    assert ft_config(cfg).deterministic
    with pytest.raises(ConfigError, match="needs format=raw"):
        ft_config(VmConfig(kernel="k", engine="bt", drives=[DriveConfig(file="d.qcow2", format="qcow2")]))
    with pytest.raises(ConfigError, match="needs mac="):
        ft_config(VmConfig(kernel="k", engine="bt", nets=[NetConfig(switch="ftv")]))
    with pytest.raises(ConfigError, match="virtio-rng"):
        ft_config(VmConfig(kernel="k", engine="bt", virtio_rng=True))


class FakePort:
    def __init__(self):
        self.sent: list[bytes] = []
        self.callback = None

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def on_receive(self, callback) -> None:
        self.callback = callback

    def close(self) -> None:
        pass


def test_nic_frames_out_wait_for_the_ack_and_frames_in_for_a_round():
    from pyvmm.devices.virtio.net import VirtioNet
    from pyvmm.ft.virtio import BackupNet, PrimaryNet
    from pyvmm.memory import GuestMemory
    port = FakePort()
    dev = VirtioNet(GuestMemory(1 << 20), port, bytes.fromhex("02a000000001"))
    incoming = []
    nic = PrimaryNet("virtio_net0", dev, lambda member, frame: incoming.append((member, frame)))
    nic.commit.pos = (10, 10)
    dev.port.send(b"out0")                     # what _transmit does with a guest's frame
    assert port.sent == []
    nic.commit.acknowledged((10, 10))
    assert port.sent == [b"out0"]
    port.callback(b"in0")                      # from the network: only queued for the recorder
    assert incoming == [(nic, b"in0")] and not dev.backlog

    bport = FakePort()
    bdev = VirtioNet(GuestMemory(1 << 20), bport, bytes.fromhex("02a000000001"))
    backup = BackupNet("virtio_net0", bdev)
    bport.callback(b"stray")                   # the backup is deaf until live
    assert not bdev.backlog
    assert backup.apply(L.NET_RX, b"in0") is None and list(bdev.backlog) == [b"in0"]
    bdev.port.send(b"out0")
    bdev.port.send(b"out1")
    backup.commit.trim(1)                      # the primary reported one frame out
    assert bport.sent == []
    backup.go_live()
    assert bport.sent == [b"out1"]
    bport.callback(b"live")
    assert list(bdev.backlog) == [b"in0", b"live"]
