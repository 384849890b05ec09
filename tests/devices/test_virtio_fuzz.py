"""Hostile drivers: random descriptor tables, rings and register writes
fed to the virtio devices directly.  Whatever the guest writes, the only
thing that may leave a device model is a QueueError (the transport turns
it into NEEDS_RESET); a GuestMemoryError would mean an access outside RAM
was attempted, any other exception a crash, and the time bound catches a
hang.  CI runs 20,000 inputs; PYVMM_VIRTIO_FUZZ=1000000 runs more."""

from __future__ import annotations

import os
import random
import struct
import time

import pytest

from pyvmm.devices.virtio.block import HEADER, VirtioBlock
from pyvmm.devices.virtio.device import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1
from pyvmm.devices.virtio.queue import DESC, QueueError, VirtQueue
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.transport.pci import VirtioPci
from pyvmm.memory import GuestMemory
from pyvmm.storage import open_image

RAM = 1 << 20
SIZE = 8
DESC_AT, AVAIL_AT, USED_AT, INDIRECT_AT, DATA_AT = 0x1000, 0x2000, 0x3000, 0x4000, 0x8000
INPUTS = int(os.environ.get("PYVMM_VIRTIO_FUZZ", "20000"))
BLK_TYPES = (0, 1, 4, 8, 11, 13, 2, 0xFFFFFFFF)


def hostile_address(r: random.Random) -> int:
    return r.choice((
        lambda: DATA_AT + r.randrange(0, 0x8000),
        lambda: r.randrange(RAM),
        lambda: RAM - r.randrange(1, 600),          # runs across the end of RAM
        lambda: RAM + r.randrange(0, 1 << 20),      # just past it
        lambda: (1 << 64) - r.randrange(1, 4096),   # wraps
        lambda: USED_AT,                            # the device's own ring
        lambda: INDIRECT_AT,
        lambda: 0,
    ))()


def hostile_length(r: random.Random) -> int:
    return r.choice((0, 1, 15, 16, 17, 48, 512, 513, 4096, 0xFFFFFFFF, r.randrange(1 << 32), r.randrange(64)))


def descriptors(r: random.Random, count: int) -> bytes:
    return b"".join(DESC.pack(hostile_address(r), hostile_length(r), r.randrange(16) if r.random() < 0.1
                              else r.randrange(8), r.randrange(SIZE + 3)) for _ in range(count))


def well_formed(r: random.Random, head: int) -> list[tuple[int, int, int, int]]:
    """A block request chain from `head` (header, data, status) for mutating."""
    data_flags = r.choice((0, 2))
    return [(DATA_AT + 16 * r.randrange(64), 16, 1, (head + 1) % SIZE),
            (DATA_AT + 0x1000 + 512 * r.randrange(8), 512 * r.randrange(1, 3), data_flags | 1, (head + 2) % SIZE),
            (DATA_AT + 0x3000 + r.randrange(64), 1, 2, 0)]


def scribble(r: random.Random, memory: GuestMemory, vq: VirtQueue, i: int) -> None:
    if r.random() < 0.6:   # mutate good chains: most requests then reach the device
        table = [DESC.unpack_from(memory.read(DESC_AT, 16 * SIZE), 16 * k) for k in range(SIZE)]
        for head in range(0, SIZE - 2, 3):
            table[head:head + 3] = well_formed(r, head)
        for _ in range(r.randrange(3)):
            k, field = r.randrange(SIZE), r.randrange(4)
            value = (hostile_address, hostile_length, lambda r: r.randrange(16),
                     lambda r: r.randrange(SIZE + 3))[field](r)
            table[k] = table[k][:field] + (value,) + table[k][field + 1:]
        memory.write(DESC_AT, b"".join(DESC.pack(*d) for d in table))
        ring = [r.choice((0, 3)) if r.random() < 0.9 else r.randrange(SIZE + 2) for _ in range(SIZE + 1)]
        ahead = r.choice((1, 1, 2, 0, SIZE + 1))
    else:
        memory.write(DESC_AT, descriptors(r, SIZE))
        memory.write(INDIRECT_AT, descriptors(r, 4))
        ring = [r.randrange(SIZE + 2) for _ in range(SIZE + 1)]
        ahead = r.choice((0, 1, 2, SIZE, SIZE + 1, r.randrange(1 << 16)))
    memory.write_u16(AVAIL_AT, r.randrange(2))
    memory.write_u16(AVAIL_AT + 2, (vq.last_avail + ahead) & 0xFFFF)
    memory.write(AVAIL_AT + 4, struct.pack(f"<{SIZE + 1}H", *ring))
    if i % 64 == 0:        # request headers where buffers may point
        memory.write(DATA_AT, b"".join(HEADER.pack(r.choice(BLK_TYPES), 0, r.choice((0, 1, 127, 1 << 40)))
                                       for _ in range(64)))


def check_used(vq: VirtQueue, before: int) -> None:
    # What the device wrote into the used ring itself is not checked: a
    # hostile chain may point its buffers at the ring (the guest's loss).
    assert (vq.used_idx - before) & 0xFFFF <= SIZE


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "fuzz.raw"
    path.write_bytes(bytes(64 * 1024))
    with open_image(str(path), "raw") as img:
        yield img


def test_random_queues_only_ever_give_queue_errors(image):
    r = random.Random(16)
    memory = GuestMemory(RAM)
    devices = [VirtioBlock(memory, image), VirtioRng(memory)]
    queues = [None, None]
    errors = 0
    start = time.monotonic()
    for i in range(INPUTS):
        k = i & 1
        if queues[k] is None:
            queues[k] = VirtQueue(memory, SIZE, DESC_AT, AVAIL_AT, USED_AT,
                                  event_idx=r.random() < 0.5, indirect=r.random() < 0.7)
        vq = queues[k]
        scribble(r, memory, vq, i)
        before = vq.used_idx
        try:
            devices[k].process(0, vq)
        except QueueError:
            errors += 1
            queues[k] = None                        # as after the driver's reset
        check_used(vq, before)
        vq.should_notify()
    elapsed = time.monotonic() - start
    assert errors and errors < INPUTS               # both outcomes were reached
    assert devices[0].requests > INPUTS // 8        # and requests reached the disk model
    assert elapsed < max(60.0, INPUTS / 200), f"{INPUTS} inputs took {elapsed:.1f} s"


def test_random_register_writes_never_escape_the_transport(image):
    """Random common-config, notify and ISR accesses, with rings full of
    junk: feature bits never offered, sizes that are not powers of two,
    notifications before DRIVER_OK.  Nothing may raise."""
    r = random.Random(1616)
    memory = GuestMemory(RAM)
    fn = VirtioPci(VirtioBlock(memory, image), 0x018000)
    useful = [(0x14, 1, v) for v in (0, 1, 3, 11, 15, 0x4F)] + [(0x18, 2, v) for v in (8, 7, 0, 4096)] + \
             [(0x20, 4, DESC_AT), (0x28, 4, AVAIL_AT), (0x30, 4, USED_AT), (0x1C, 2, 1), (0x16, 2, 0),
              (0x08, 4, 1), (0x0C, 4, 1), (0x08, 4, 0), (0x0C, 4, F_RING_EVENT_IDX | F_RING_INDIRECT_DESC),
              (0x0C, 4, 0xFFFFFFFF), (0x08, 4, F_VERSION_1 >> 32)]
    reached_ok = 0
    for i in range(INPUTS // 4):
        if r.random() < 0.6:
            fn.write(*r.choice(useful))
        elif r.random() < 0.5:
            fn.write(0x3000 + 4 * r.randrange(3), 2, 0)
            scribble(r, memory, fn.queues[0].vq or VirtQueue(memory, SIZE, DESC_AT, AVAIL_AT, USED_AT), i)
        else:
            size = r.choice((1, 2, 4, 8))
            offset = r.randrange(0x4000 - size)
            if r.random() < 0.5:
                fn.write(offset, size, r.randrange(1 << 8 * size))
            else:
                fn.read(offset, size)
        reached_ok += bool(fn.status_byte & 4 and fn.queues[0].vq is not None)
        assert 0 <= fn.status_byte < 256
    assert reached_ok                                  # the random walk did bring the device up
