"""virtio-net with VIRTIO_NET_F_MRG_RXBUF (virtio 1.2, 5.1.6.3/5.1.6.4): a
frame larger than one receive chain fills several, each but the last to
the brim, with num_buffers in the first header; the driver sees all of
them in one used-idx update.  Without the feature num_buffers stays 1.
Too few buffers make the frame wait (none taken); a frame that the whole
ring could not hold is dropped.  Driven from the host side (no guest)."""

from __future__ import annotations

import pytest

from pyvmm.devices.virtio import net
from pyvmm.devices.virtio.device import F_VERSION_1
from pyvmm.devices.virtio.net import NET_HDR, NET_HDR_SIZE

from .test_virtio_net import QSIZE, FakePort, NetDriver, frame
from .virtio_driver import DRIVER_OK, NEEDS_RESET


def driver(merge: bool = True) -> NetDriver:
    d = NetDriver(FakePort())
    assert d.init(F_VERSION_1 | (net.F_MRG_RXBUF if merge else 0)) & DRIVER_OK
    return d


def delivered(d: NetDriver, start: int = 0) -> list[tuple[int, bytes]]:
    """(num_buffers, frame) for each frame in the RX used ring from entry
    `start` on, following num_buffers across used entries."""
    used = d.used_of(0)[start:]
    out = []
    while used:
        head, written = used[0]
        bufs = d.rx_posted[head]
        data = b"".join(d.memory.read(a, n) for a, n in bufs)[:written]
        count = NET_HDR.unpack(data[:NET_HDR_SIZE])[6]
        payload = data[NET_HDR_SIZE:]
        for head, written in used[1:count]:
            payload += b"".join(d.memory.read(a, n) for a, n in d.rx_posted[head])[:written]
        out.append((count, payload))
        used = used[count:]
    return out


def test_a_big_frame_spreads_over_several_chains():
    d = driver()
    for _ in range(4):
        d.post_rx(512)
    f = frame(1514, 3)
    d.port.inject(f)
    assert delivered(d) == [(3, f)]                      # 12 + 1514 bytes: 512 + 512 + 502
    assert [w for _, w in d.used_of(0)] == [512, 512, 1526 - 1024]
    d.port.inject(frame(60, 4))                          # the fourth chain is still there
    assert delivered(d, 3) == [(1, frame(60, 4))]
    assert d.device.rx_frames == 2 and d.device.rx_dropped == 0


def test_without_the_feature_num_buffers_is_one_and_nothing_spreads():
    d = driver(merge=False)
    d.post_rx(512)
    d.post_rx(2048)
    d.port.inject(frame(1514))
    assert d.used_of(0)[0][1] == 0 and d.device.rx_dropped == 1   # too big for one chain: dropped
    d.port.inject(frame(100, 1))
    assert delivered(d, 1) == [(1, frame(100, 1))]


def test_too_few_buffers_make_the_frame_wait_without_taking_any():
    d = driver()
    d.post_rx(512)
    d.post_rx(512)
    d.port.inject(frame(1514, 5))
    assert d.used_of(0) == [] and len(d.device.backlog) == 1
    d.post_rx(512)                                       # the kick brings the third
    assert delivered(d) == [(3, frame(1514, 5))]
    assert not d.device.backlog and not d.status & NEEDS_RESET


def test_a_frame_the_whole_ring_cannot_hold_is_dropped_not_stuck():
    d = driver()
    for _ in range(QSIZE):
        d.post_rx(NET_HDR_SIZE + 4, kick=False)          # 16 bytes each: 256 in all
    d.kick(0)
    d.port.inject(frame(1514))
    assert d.device.rx_dropped == 1 and d.used_of(0) == []
    d.port.inject(frame(60, 2))                          # fits in 4 chains of 16 bytes
    assert delivered(d) == [(5, frame(60, 2))]
    assert not d.status & NEEDS_RESET


def test_backlog_frames_go_in_order_as_buffers_come():
    d = driver()
    for i in range(3):
        d.port.inject(frame(1000, i))
    for _ in range(6):
        d.post_rx(600)
    assert [f for _, f in delivered(d)] == [frame(1000, i) for i in range(3)]


@pytest.mark.parametrize("case", ["readable", "no_header_room"])
def test_a_bad_chain_among_the_merged_ones_needs_reset(case):
    d = driver()
    d.post_rx(512)
    a, n = d.buffer(512 if case == "readable" else 4)
    head = d.chain(0, [(a, n, case != "readable")])
    d.rx_posted[head] = [(a, n)]
    d.port.inject(frame(1000))
    assert d.status & NEEDS_RESET
    d.port.inject(frame(60))                             # the device stays quiet, nothing raises
