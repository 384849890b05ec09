"""Block migration in-process: a running guest's disk is copied along
with its RAM into a destination whose image is its own and empty, while
writes keep landing on the source's disk (made here through the
virtio-blk device's image, the path the guest's requests take); after
the move the two images are byte for byte the same.  A destination
without the drive, or with one of another size, refuses the stream."""

from __future__ import annotations

import io
import os
import random
import threading
import time

import pytest

from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import DriveConfig, VmConfig
from pyvmm.machine import StopReason
from pyvmm.migration import blocks
from pyvmm.migration.receiver import load_stream
from pyvmm.migration.sender import Migration, Parameters
from pyvmm.migration.stream import StreamError
from pyvmm.migration.uri import parse_uri

from tests.api.counterguest import SOURCE, counts
from tests.migration.test_stream import Recorder
from tests.rawguest import build_guest, raw_boot

DISK = 4 << 20


def _machine(out: bytearray, path, size: int = DISK):
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.truncate(size)
    cfg = VmConfig(mem_mib=16, engine="bt", no_reboot=True, drives=[DriveConfig(str(path), "raw", id="disk0")])
    return build_machine(cfg, out.extend, boot=raw_boot(build_guest(SOURCE, "prot"), "prot"))


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """(the recorded stream, the source image's bytes at the end, the job)."""
    work = tmp_path_factory.mktemp("blk")
    src_path = work / "src.img"
    rng = random.Random(20)
    with open(src_path, "wb") as f:
        f.truncate(DISK)
        for _ in range(16):                     # data here and there, the rest zero
            f.seek(rng.randrange(0, DISK - 8192))
            f.write(rng.randbytes(rng.randrange(1, 8192)))
    out = bytearray()
    src = _machine(out, src_path)
    thread = threading.Thread(target=src.run, daemon=True)
    thread.start()
    device = src.devices["disk0"].device
    stop = threading.Event()

    def guest_writes() -> None:
        # Writes all through the migration, from before pass 1 to the pause,
        # on the drive's I/O thread as a guest's requests are: each job looks
        # the device's image up when it runs, so one picked up just before
        # tracking starts must land before the first pass reads the disk.
        io = device._io
        assert io is not None                   # the machine gave the drive its I/O thread
        while not stop.is_set():
            offset, data = rng.randrange(0, DISK - 4096) & ~511, rng.randbytes(4096)
            io.submit(lambda o=offset, d=data: device.image.write(o, d))
            time.sleep(0.001)
        assert io.wait_idle(10)
    writer = threading.Thread(target=guest_writes, daemon=True)
    try:
        deadline = time.monotonic() + 30
        while len(counts(out)) < 2:
            assert time.monotonic() < deadline, bytes(out[-80:])
            time.sleep(0.01)
        rec = Recorder(str(work / "dest.sock"))
        job = Migration(parse_uri(f"unix:{work / 'dest.sock'}"),
                        Parameters(downtime_limit_ms=1, max_bandwidth=0), blk=True)
        writer.start()

        def pause() -> None:
            stop.set()
            writer.join(10)
            src.pause()
        job.run(src, pause, src.resume)
        assert job.status == "completed", job.error
        rec.thread.join(10)
        assert not isinstance(device.image, blocks.DirtyBlocks)     # the device writes straight again
        src.devices["disk0"].device.image.flush()
        yield bytes(rec.data), src_path.read_bytes(), job, work
    finally:
        stop.set()
        src.request_stop(StopReason.USER)
        thread.join(30)
        destroy_machine(src)


def test_the_destination_image_equals_the_source_image(moved):
    data, source_bytes, job, work = moved
    assert job.passes >= 2            # the writes kept pre-copy going for more than one pass
    dest_path = work / "dest.img"
    dest = _machine(bytearray(), dest_path)
    try:
        load_stream(dest, io.BytesIO(data))
        dest.devices["disk0"].device.image.flush()
    finally:
        destroy_machine(dest)
    got = dest_path.read_bytes()
    assert got == source_bytes, next(i for i in range(DISK) if got[i] != source_bytes[i])


def test_the_first_pass_leaves_zero_chunks_out(tmp_path):
    """Pass 1 sends only the chunks holding data (the rest of a sparse image
    costs nothing); the later passes' size depends on how fast the guest
    writes, so this is judged on pass 1 alone."""
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(DISK)
        f.seek(3 * blocks.CHUNK + 100)
        f.write(b"x" * 5000)
    machine = _machine(bytearray(), path)
    try:
        sender = blocks.BlockSender(machine)
        sender.start()
        sent = sum(len(bytes(part)) for rec in sender.records(sender.all_chunks(), True) for part in rec)
        every = sum(len(bytes(part)) for rec in sender.records(sender.all_chunks(), False) for part in rec)
        sender.stop()
    finally:
        destroy_machine(machine)
    assert blocks.CHUNK <= sent < 2 * blocks.CHUNK      # the one chunk with data, and a header
    assert every > sent


@pytest.mark.parametrize("size, why", [(DISK * 2, "bytes here"), (None, "no writable drive")])
def test_a_destination_with_other_drives_refuses(moved, tmp_path, size, why):
    data, _, _, _ = moved
    if size is None:
        dest = build_machine(VmConfig(mem_mib=16, engine="bt", no_reboot=True), bytearray().extend,
                             boot=raw_boot(build_guest(SOURCE, "prot"), "prot"))
    else:
        dest = _machine(bytearray(), tmp_path / "other.img", size)
    try:
        with pytest.raises(StreamError, match=why):
            load_stream(dest, io.BytesIO(data))
    finally:
        destroy_machine(dest)


@pytest.mark.parametrize("run, why", [
    ((0, DISK - 512, 4096, blocks.DATA), "bad block run"),        # past the end of the disk
    ((1, 0, 4096, blocks.DATA), "bad block run"),                 # no such drive
    ((0, 0, 4096, 7), "bad block run"),                           # unknown kind
    ((0, 0, 4096, blocks.DATA), "truncated"),                     # data missing
])
def test_bad_block_runs_are_refused(tmp_path, run, why):
    import struct
    dest = _machine(bytearray(), tmp_path / "d.img")
    try:
        devices = blocks.check_drives(dest, [{"name": "disk0", "size": DISK}])
        payload = struct.pack(">I", 1) + blocks.BLOCK_RUN.pack(*run)
        with pytest.raises(StreamError, match=why):
            blocks.apply(devices, payload)
    finally:
        destroy_machine(dest)


def test_tracking_starts_only_once_a_write_already_under_way_has_landed(tmp_path):
    """A job on the drive's I/O thread took the untracked image just before
    tracking began, and writes a moment later: BlockSender.start() waits
    for it, so the first pass, which reads every chunk after start(), finds
    that write (without the wait it could read the chunk first and the
    write would never be sent)."""
    m = _machine(bytearray(), tmp_path / "d.img")
    try:
        device = m.devices["disk0"].device
        assert device._io is not None
        took, go = threading.Event(), threading.Event()

        def slow_write() -> None:
            image = device.image                 # as a request's job does when it runs
            took.set()
            go.wait(10)
            image.write(0, b"W" * 512)
        device._io.submit(slow_write)
        assert took.wait(10)
        sender = blocks.BlockSender(m)
        started = threading.Thread(target=sender.start)
        started.start()
        started.join(0.3)
        assert started.is_alive()                # still waiting for the write under way
        go.set()
        started.join(10)
        assert not started.is_alive()
        assert sender.trackers["disk0"].inner.read(0, 512) == b"W" * 512
        sender.stop()
    finally:
        destroy_machine(m)
