"""virtio-blk and virtio-rng driven through virtio-pci on real buses, with
the virtqueue laid out in a GuestMemory by tests/devices/virtio_driver.py."""

from __future__ import annotations

import os
import struct

import pytest

from pyvmm.devices.virtio import block
from pyvmm.devices.virtio.block import HEADER, SEGMENT, VirtioBlock
from pyvmm.devices.virtio.device import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1
from pyvmm.devices.virtio.queue import DESC, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.device import DeviceStateError
from pyvmm.storage import open_image

from .virtio_driver import AVAIL_AT, DESC_AT, DRIVER_OK, FEATURES_OK, NEEDS_RESET, USED_AT, Driver

DISK = 1 << 20


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.raw"
    data = bytes(range(256)) * (DISK // 256)
    path.write_bytes(data)
    return str(path)


def blk(path, readonly=False, **init):
    image = open_image(path, "raw", readonly=readonly)
    d = Driver(lambda mem: VirtioBlock(mem, image, serial="disk-serial-0", readonly=readonly), 0x018000)
    assert d.init(**init) & DRIVER_OK
    return d


def request(d, kind, sector, data=b"", read_len=0):
    parts = [(HEADER.pack(kind, 0, sector), False)]
    if data:
        parts.append((data, False))
    if read_len:
        parts.append((read_len, True))
    parts.append((1, True))
    placed = d.submit(parts)
    status_addr = placed[-1][0]
    return placed, d.memory.read_u8(status_addr)


def test_config_and_features(disk):
    d = blk(disk)
    capacity, = struct.unpack_from("<Q", d.device_config(8))
    assert capacity == DISK // 512
    assert struct.unpack_from("<I", d.device_config(24), 20)[0] == 512     # blk_size
    offered = d.offered()
    assert offered & F_VERSION_1 and offered & F_RING_INDIRECT_DESC and offered & F_RING_EVENT_IDX
    assert offered & block.F_FLUSH and offered & block.F_DISCARD and not offered & block.F_RO


def test_features_ok_needs_version_1_and_only_offered_bits(disk):
    d = blk(disk)
    assert not d.init(features=block.F_FLUSH) & FEATURES_OK          # no VERSION_1
    assert not d.init(features=F_VERSION_1 | 1 << 40) & FEATURES_OK   # never offered
    assert d.init(features=F_VERSION_1) & DRIVER_OK


def test_read_write_flush_get_id(disk):
    d = blk(disk)
    placed, status = request(d, block.T_IN, 2, read_len=1024)
    assert status == block.S_OK
    assert d.memory.read(placed[1][0], 1024) == (bytes(range(256)) * 4)
    assert d.used()[-1] == (0, 1025)                    # data plus the status byte
    payload = os.urandom(1536)
    _, status = request(d, block.T_OUT, 7, data=payload)
    assert status == block.S_OK
    with open(disk, "rb") as f:
        f.seek(7 * 512)
        assert f.read(1536) == payload
    _, status = request(d, block.T_FLUSH, 0)
    assert status == block.S_OK
    placed, status = request(d, block.T_GET_ID, 0, read_len=20)
    assert status == block.S_OK and d.memory.read(placed[1][0], 20) == b"disk-serial-0".ljust(20, b"\0")
    assert len(d.used()) == 4


def test_interrupt_is_raised_and_isr_read_lowers_it(disk):
    d = blk(disk)
    request(d, block.T_IN, 0, read_len=512)
    assert d.irq.level == 1 and d.cfg_read(0x06, 2) & 0x8    # status.interrupt mirrors it
    assert d.read_isr() == 1
    assert d.irq.level == 0 and d.read_isr() == 0
    d.cfg_write(0x04, 2, d.cfg_read(0x04, 2) | 0x400)        # INTx disabled: the line stays low
    d.memory.write_u16(AVAIL_AT + 4 + 2 * d.queue_size, 1)   # used_event: the next one
    request(d, block.T_IN, 0, read_len=512)
    assert d.irq.level == 0 and d.read_isr() == 1


def test_discard_and_write_zeroes(disk):
    d = blk(disk)
    _, status = request(d, block.T_WRITE_ZEROES, 0, data=SEGMENT.pack(4, 2, 0))
    assert status == block.S_OK
    with open(disk, "rb") as f:
        data = f.read(8 * 512)
    assert data[4 * 512:6 * 512] == bytes(1024) and data[:4 * 512] == bytes(range(256)) * 8
    _, status = request(d, block.T_DISCARD, 0, data=SEGMENT.pack(100, 8, 0))
    assert status == block.S_OK
    _, status = request(d, block.T_DISCARD, 0, data=SEGMENT.pack(DISK // 512, 1, 0))
    assert status == block.S_IOERR                        # past the end


def test_bad_requests_get_a_status_not_a_reset(disk):
    d = blk(disk)
    assert request(d, block.T_IN, DISK // 512 - 1, read_len=1024)[1] == block.S_IOERR
    assert request(d, block.T_IN, 0, read_len=100)[1] == block.S_IOERR     # not whole sectors
    assert request(d, 77, 0)[1] == block.S_UNSUPP
    d.submit([(b"short", False), (1, True)])
    assert d.memory.read_u8(d.buf_cursor - 0x1000) == block.S_IOERR
    assert not d.status & NEEDS_RESET


def test_read_only_disk(disk):
    d = blk(disk, readonly=True)
    assert d.offered() & block.F_RO and not d.offered() & block.F_DISCARD
    assert request(d, block.T_OUT, 0, data=bytes(512))[1] == block.S_IOERR
    assert request(d, block.T_IN, 0, read_len=512)[1] == block.S_OK


def test_indirect_descriptors(disk):
    d = blk(disk)
    hdr = d.buffer(HEADER.pack(block.T_IN, 0, 1))
    data = d.buffer(512)
    status = d.buffer(1)
    table = b"".join([DESC.pack(*hdr, DESC_F_NEXT, 1), DESC.pack(*data, DESC_F_WRITE | DESC_F_NEXT, 2),
                      DESC.pack(*status, DESC_F_WRITE, 0)])
    taddr, tlen = d.buffer(table)
    d.memory.write(DESC_AT, DESC.pack(taddr, tlen, DESC_F_INDIRECT, 0))
    d.memory.write_u16(AVAIL_AT + 4, 0)
    d.memory.write_u16(AVAIL_AT + 2, 1)
    d.kick()
    assert d.memory.read_u8(status[0]) == block.S_OK
    assert d.memory.read(data[0], 512) == bytes(range(256)) * 2
    assert d.used() == [(0, 513)]


def test_event_idx_suppresses_interrupts_until_used_event(disk):
    d = blk(disk)
    d.memory.write_u16(AVAIL_AT + 4 + 2 * d.queue_size, 1)   # used_event: after the 2nd entry
    request(d, block.T_FLUSH, 0)
    assert d.irq.raised == 0
    assert d.memory.read_u16(USED_AT + 4 + 8 * d.queue_size) == 1   # avail_event written
    request(d, block.T_FLUSH, 0)
    assert d.irq.raised == 1


def test_no_interrupt_flag_without_event_idx(disk):
    d = blk(disk, features=F_VERSION_1)
    d.memory.write_u16(AVAIL_AT, 1)                          # VIRTQ_AVAIL_F_NO_INTERRUPT
    request(d, block.T_FLUSH, 0)
    assert d.irq.raised == 0 and len(d.used()) == 1
    d.memory.write_u16(AVAIL_AT, 0)
    request(d, block.T_FLUSH, 0)
    assert d.irq.raised == 1


def test_hostile_chain_marks_needs_reset(disk):
    d = blk(disk)
    d.memory.write(DESC_AT, DESC.pack(0x100000, 16, DESC_F_NEXT, 1))
    d.memory.write(DESC_AT + 16, DESC.pack(0x100000, 16, DESC_F_NEXT, 0))   # loops back
    d.memory.write_u16(AVAIL_AT + 2, 1)
    d.kick()
    assert d.status & NEEDS_RESET and d.read_isr() & 2      # config-change interrupt
    request(d, block.T_FLUSH, 0)                             # ignored until reset
    assert d.used() == []
    assert d.init() & DRIVER_OK and not d.status & NEEDS_RESET   # a reset recovers it
    d.next_desc = d.avail_idx = 0
    assert request(d, block.T_FLUSH, 0)[1] == block.S_OK


def test_notify_before_driver_ok_and_bad_queue_size(disk):
    image = open_image(disk, "raw")
    d = Driver(lambda mem: VirtioBlock(mem, image), 0x018000)
    d.queue_size = 16
    d.submit([(HEADER.pack(block.T_FLUSH, 0, 0), False), (1, True)])   # device not even set up
    assert d.used() == [] and d.status == 0
    assert d.init(queue_size=12) & NEEDS_RESET              # not a power of two
    assert d.init(queue_size=1024) & NEEDS_RESET            # above the maximum


def test_state_round_trip(disk):
    d = blk(disk)
    request(d, block.T_IN, 0, read_len=512)
    state = d.fn.save()
    request(d, block.T_IN, 0, read_len=512)
    d.fn.restore(state)
    assert d.fn.queues[0].vq.used_idx == 1 and d.fn.status_byte & DRIVER_OK
    with pytest.raises(DeviceStateError):
        d.fn.restore({**state, "queues": []})
    assert d.fn.queues[0].vq.used_idx == 1


def test_rng_fills_writable_buffers():
    source = lambda n: bytes([0xA5]) * n
    d = Driver(lambda mem: VirtioRng(mem, source))
    assert d.init() & DRIVER_OK
    placed = d.submit([(64, True)])
    assert d.memory.read(placed[0][0], 64) == b"\xa5" * 64
    assert d.used() == [(0, 64)] and d.device.bytes_given == 64
    placed = d.submit([(16, True), (16, True)])
    assert d.used()[-1] == (1, 32)


RAM_END = 16 << 20      # the Driver's GuestMemory


@pytest.mark.parametrize("table, features", [
    ([(0x100000, 1, DESC_F_WRITE | DESC_F_NEXT, 1), (0x101000, 16, DESC_F_NEXT, 2),
      (0x102000, 1, DESC_F_WRITE, 0)], None),                                       # readable after writable
    ([(RAM_END - 8, 16, DESC_F_NEXT, 1), (0x102000, 1, DESC_F_WRITE, 0)], None),     # across the end of RAM
    ([(RAM_END + 0x1000, 16, DESC_F_NEXT, 1), (0x102000, 1, DESC_F_WRITE, 0)], None),  # outside RAM
    ([(0x100000, 0xFFFFFFFF, DESC_F_NEXT, 1), (0x102000, 1, DESC_F_WRITE, 0)], None),  # huge length
    ([(0x100000, 16, DESC_F_NEXT, 999)], None),                                       # next past the table
    ([(0x100000, 16, 0, 0)], None),                                                   # no status byte
    ([(0x104000, 32, DESC_F_INDIRECT, 0)], F_VERSION_1),                              # indirect never negotiated
    ([(0x104000, 17, DESC_F_INDIRECT, 0)], None),                                     # table not whole descriptors
    ([(0x104000, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)], None),                       # INDIRECT with NEXT
])
def test_hostile_chains_give_needs_reset(disk, table, features):
    d = blk(disk, features=features)
    d.memory.write(0x104000, DESC.pack(0x104000, 16, DESC_F_INDIRECT, 0))       # a nested indirect table
    for i, desc in enumerate(table):
        d.memory.write(DESC_AT + 16 * i, DESC.pack(*desc))
    d.memory.write_u16(AVAIL_AT + 2, 1)
    d.kick()
    assert d.status & NEEDS_RESET and d.used() == []


def test_nested_indirect_table_gives_needs_reset(disk):
    d = blk(disk)
    d.memory.write(0x104000, DESC.pack(0x105000, 16, DESC_F_INDIRECT, 0))
    d.memory.write(DESC_AT, DESC.pack(0x104000, 16, DESC_F_INDIRECT, 0))
    d.memory.write_u16(AVAIL_AT + 2, 1)
    d.kick()
    assert d.status & NEEDS_RESET


def test_avail_index_running_ahead_gives_needs_reset(disk):
    d = blk(disk)
    d.memory.write_u16(AVAIL_AT + 2, d.queue_size + 1)
    d.kick()
    assert d.status & NEEDS_RESET and d.used() == []
