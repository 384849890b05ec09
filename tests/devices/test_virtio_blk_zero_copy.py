"""virtio-blk writes go to the image straight from guest RAM (views over
the descriptors' buffers, pwritev for raw images): the data must reach the
image bit-exact however the driver splits it, across pages and RAM
regions, in every format, and hostile buffers must still be refused."""

from __future__ import annotations

import os
import random
import struct

import pytest

from pyvmm.devices.virtio import block
from pyvmm.devices.virtio.block import HEADER, VirtioBlock
from pyvmm.devices.virtio.device import F_RING_INDIRECT_DESC, F_VERSION_1
from pyvmm.devices.virtio.queue import DESC, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from pyvmm.memory import HIGH_RAM_BASE, LOW_RAM_LIMIT
from pyvmm.storage import create_image, open_image
from pyvmm.storage import raw

from .virtio_driver import AVAIL_AT, DESC_AT, NEEDS_RESET, Driver

MIB = 1 << 20
DISK = 4 * MIB
MEM_MIB = LOW_RAM_LIMIT // MIB + 16        # RAM below 3 GiB and 16 MiB above 4 GiB
QUEUE = 256
INDIRECT_AT = 0x40000


def rig(image, features=F_VERSION_1):
    d = Driver(lambda mem: VirtioBlock(mem, image), 0x018000, mem_mib=MEM_MIB)
    d.init(features=features, queue_size=QUEUE)
    return d


def place(d, parts):
    """Writes each (address, data or length, device-writable) part into guest
    RAM; returns the descriptors (addr, len, flags) in chain order."""
    descs = []
    for addr, data, writable in parts:
        if isinstance(data, int):
            data = bytes(data)
        d.memory.write(addr, data)
        descs.append((addr, len(data), DESC_F_WRITE if writable else 0))
    return descs


def make_available(d, head):
    d.memory.write_u16(AVAIL_AT + 4 + 2 * (d.avail_idx % QUEUE), head)
    d.avail_idx = (d.avail_idx + 1) & 0xFFFF
    d.memory.write_u16(AVAIL_AT + 2, d.avail_idx)
    d.kick()


def submit_direct(d, parts):
    descs = place(d, parts)
    for i, (addr, n, flags) in enumerate(descs):
        more = DESC_F_NEXT if i < len(descs) - 1 else 0
        d.memory.write(DESC_AT + 16 * i, DESC.pack(addr, n, flags | more, i + 1))
    make_available(d, 0)


def submit_indirect(d, parts):
    descs = place(d, parts)
    table = b"".join(DESC.pack(addr, n, flags | (DESC_F_NEXT if i < len(descs) - 1 else 0), i + 1)
                     for i, (addr, n, flags) in enumerate(descs))
    d.memory.write(INDIRECT_AT, table)
    d.memory.write(DESC_AT, DESC.pack(INDIRECT_AT, len(table), DESC_F_INDIRECT, 0))
    make_available(d, 0)


def split_write(sector, payload, pieces):
    """The header split over two buffers, the second also holding the first
    data bytes, then the data cut at `pieces` (address, length) in order;
    the status byte last.  Returns the parts."""
    header = HEADER.pack(block.T_OUT, 0, sector)
    first_addr, first_len = pieces[0]
    parts = [(0x200000 - 5, header[:5], False), (first_addr, header[5:] + payload[:first_len], False)]
    at = first_len
    for addr, n in pieces[1:]:
        parts.append((addr, payload[at:at + n], False))
        at += n
    assert at == len(payload)
    parts.append((0x300000, 1, True))
    return parts


def pieces_across_pages_and_regions(total):
    """Buffers of odd sizes, several straddling 4 KiB pages, one ending at
    the top of low RAM and the rest above 4 GiB."""
    sizes = [1, 7, 509, 4095, 3, 2048, 4097, 1000, 13]
    addrs = [0x500FFF, 0x501FFC, 0x502F00, 0x503801, LOW_RAM_LIMIT - 3, 0x504800, HIGH_RAM_BASE + 0xFFF,
             HIGH_RAM_BASE + 0x5F80, HIGH_RAM_BASE + 0x7FF9]
    sizes.append(total - sum(sizes))
    addrs.append(HIGH_RAM_BASE + 0x10001)
    return list(zip(addrs, sizes))


@pytest.fixture
def raw_disk(tmp_path):
    path = tmp_path / "disk.raw"
    before = random.Random(1).randbytes(DISK)
    path.write_bytes(before)
    return str(path), before


def test_write_split_across_pages_and_regions_reaches_raw_image_exactly(raw_disk):
    path, before = raw_disk
    image = open_image(path, "raw")
    d = rig(image)
    payload = os.urandom(16 * 1024)
    submit_direct(d, split_write(9, payload, pieces_across_pages_and_regions(len(payload))))
    assert d.memory.read_u8(0x300000) == block.S_OK
    image.close()
    after = open(path, "rb").read()
    assert after[9 * 512:9 * 512 + len(payload)] == payload
    assert after[:9 * 512] == before[:9 * 512] and after[9 * 512 + len(payload):] == before[9 * 512 + len(payload):]


def test_write_of_more_buffers_than_iov_max(raw_disk, monkeypatch):
    """1,536 buffers in an indirect table: pwritev in IOV_MAX batches, here 100."""
    monkeypatch.setattr(raw, "IOV_MAX", 100)
    path, _ = raw_disk
    image = open_image(path, "raw")
    d = rig(image, F_VERSION_1 | F_RING_INDIRECT_DESC)
    payload = os.urandom(1536 * 512)
    pieces = [(0x600000 + i * 0x301, 512) for i in range(1536)]     # gaps between them, odd addresses
    submit_indirect(d, split_write(100, payload, pieces))
    assert d.memory.read_u8(0x300000) == block.S_OK
    assert image.read(100 * 512, len(payload)) == payload


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_split_write_reaches_qcow2_and_vmdk_exactly(tmp_path, fmt):
    path = str(tmp_path / f"disk.{fmt}")
    create_image(path, fmt, DISK)
    image = open_image(path, fmt)
    d = rig(image)
    payload = os.urandom(96 * 1024)        # more than one qcow2 cluster / vmdk grain, unaligned start
    submit_direct(d, split_write(3, payload, pieces_across_pages_and_regions(len(payload))))
    assert d.memory.read_u8(0x300000) == block.S_OK
    # the buffers change after the request completed: the image must not follow
    d.memory.write(HIGH_RAM_BASE, bytes(0x20000))
    image.close()
    with open_image(path, fmt, readonly=True) as again:
        assert again.read(3 * 512, len(payload)) == payload
        assert again.read(0, 3 * 512) == bytes(3 * 512)


def test_single_buffer_write_hands_the_image_a_read_only_view(raw_disk):
    """No copy: the image gets a read-only view of the guest's buffer."""
    path, _ = raw_disk
    seen = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def write(self, offset, data):
            seen.append((type(data), getattr(data, "readonly", None), bytes(data)))
            self.inner.write(offset, data)

    d = rig(Recording(open_image(path, "raw")))
    payload = os.urandom(4096)
    submit_direct(d, [(0x200000, HEADER.pack(block.T_OUT, 0, 1), False), (0x201000, payload, False),
                      (0x300000, 1, True)])
    assert d.memory.read_u8(0x300000) == block.S_OK
    assert seen == [(memoryview, True, payload)]


def test_wrapper_without_writev_gets_one_joined_write(raw_disk):
    """A wrapper that forwards unknown attributes must not be bypassed by
    the raw image's writev: it sees the whole request through write()."""
    path, _ = raw_disk
    seen = []

    class Wrapper:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def write(self, offset, data):
            seen.append((offset, bytes(data)))
            self.inner.write(offset, data)

    image = Wrapper(open_image(path, "raw"))
    d = rig(image)
    payload = os.urandom(8192)
    submit_direct(d, split_write(4, payload, pieces_across_pages_and_regions(len(payload))))
    assert d.memory.read_u8(0x300000) == block.S_OK
    assert seen == [(4 * 512, payload)]
    assert image.read(4 * 512, len(payload)) == payload


@pytest.mark.parametrize("addr, length", [
    (LOW_RAM_LIMIT - 512, 1024),               # runs off the top of low RAM into the hole
    (HIGH_RAM_BASE + 16 * MIB - 512, 1024),    # past the end of RAM
    (LOW_RAM_LIMIT + 0x1000, 512),             # in the hole
    (0x500000, 1 << 31),                       # more than any request may claim
])
def test_write_buffer_outside_ram_is_refused_and_image_untouched(raw_disk, addr, length):
    path, before = raw_disk
    image = open_image(path, "raw")
    d = rig(image)
    header_at, status_at = 0x200000, 0x300000
    d.memory.write(header_at, HEADER.pack(block.T_OUT, 0, 0))
    for i, (a, n, flags) in enumerate([(header_at, HEADER.size, 0), (addr, length, 0), (status_at, 1, DESC_F_WRITE)]):
        d.memory.write(DESC_AT + 16 * i, DESC.pack(a, n, flags | (DESC_F_NEXT if i < 2 else 0), i + 1))
    make_available(d, 0)
    assert d.status & NEEDS_RESET
    assert d.used() == []
    image.close()
    assert open(path, "rb").read() == before


def test_overlapping_buffers_write_what_the_guest_named(raw_disk):
    """Two descriptors naming the same RAM: each contributes its bytes, in
    chain order, as a device reading them one after the other would."""
    path, _ = raw_disk
    image = open_image(path, "raw")
    d = rig(image)
    data = os.urandom(1024)
    d.memory.write(0x400000, data)
    d.memory.write(0x200000, HEADER.pack(block.T_OUT, 0, 2))
    descs = [(0x200000, HEADER.size, 0), (0x400000, 1024, 0), (0x400200, 512, 0), (0x300000, 1, DESC_F_WRITE)]
    for i, (a, n, flags) in enumerate(descs):
        d.memory.write(DESC_AT + 16 * i, DESC.pack(a, n, flags | (DESC_F_NEXT if i < 3 else 0), i + 1))
    make_available(d, 0)
    assert d.memory.read_u8(0x300000) == block.S_OK
    assert image.read(2 * 512, 1536) == data + data[512:]


# --- RawImage.writev on its own -----------------------------------------------------------

def test_raw_writev_goes_on_after_short_writes(raw_disk, monkeypatch):
    path, _ = raw_disk
    real = os.pwritev
    calls = []

    def short(fd, buffers, offset):      # at most 700 bytes per call, as a host may do
        calls.append(len(buffers))
        joined = b"".join(bytes(b) for b in buffers)[:700]
        return real(fd, [joined], offset)

    monkeypatch.setattr(raw.os, "pwritev", short)
    monkeypatch.setattr(raw, "IOV_MAX", 4)
    image = open_image(path, "raw")
    parts = [os.urandom(n) for n in (300, 1, 999, 512, 2000, 7, 0, 1)]
    image.writev(4096 + 5, [memoryview(p) for p in parts])
    monkeypatch.setattr(raw.os, "pwritev", real)
    assert image.read(4096 + 5, sum(map(len, parts))) == b"".join(parts)
    assert len(calls) > 5 and max(calls) <= 4


def test_raw_writev_that_makes_no_progress_is_an_image_error(raw_disk, monkeypatch):
    path, _ = raw_disk
    monkeypatch.setattr(raw.os, "pwritev", lambda fd, buffers, offset: 0)
    image = open_image(path, "raw")
    with pytest.raises(raw.ImageError, match="wrote nothing"):
        image.writev(0, [b"", b"abc"])     # an empty buffer first must not make it loop


def test_raw_writev_checks_the_range_first(raw_disk):
    path, before = raw_disk
    image = open_image(path, "raw")
    with pytest.raises(raw.ImageError):
        image.writev(DISK - 512, [bytes(512), bytes(1)])
    ro = open_image(path, "raw", readonly=True)
    with pytest.raises(raw.ImageError):
        ro.writev(0, [b"x"])
    image.close()
    assert open(path, "rb").read() == before


def test_wrappers_mark_and_flush_vectored_writes(raw_disk):
    from pyvmm.migration.blocks import CHUNK, DirtyBlocks
    from pyvmm.storage.cache import CachedImage

    path, _ = raw_disk
    inner = open_image(path, "raw")
    flushes = []
    inner_flush = inner.flush
    inner.flush = lambda: (flushes.append(1), inner_flush())
    dirty = DirtyBlocks(CachedImage(inner, "writethrough"))
    parts = [os.urandom(CHUNK), os.urandom(100)]
    dirty.writev(CHUNK * 2 + 7, [memoryview(p) for p in parts])
    assert dirty.take() == [2, 3]
    assert flushes == [1]
    assert inner.read(CHUNK * 2 + 7, CHUNK + 100) == b"".join(parts)
    direct = CachedImage(open_image(path, "raw"), "none")
    aligned = [os.urandom(4096), os.urandom(4096)]
    direct.writev(8192, [memoryview(p) for p in aligned])
    assert direct.read(8192, 8192) == b"".join(aligned)
    if direct.direct_fd >= 0:          # the host file system has O_DIRECT
        assert direct.direct_requests >= 1
    direct.close()
