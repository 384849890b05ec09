"""virtio-net's notifications as a Linux driver with EVENT_IDX uses them
(virtio 1.2, 2.7.7 and 2.7.10): the driver kicks only when the device's
avail_event says so, and the device interrupts only when the driver's
used_event says so.  Either side getting it wrong costs no frame and
raises no error: a frame then waits for some later kick or interrupt (a
timer tick, the next packet, a TCP retransmission), which is how a
VM-to-VM TCP stream slows to a few packets a second (issue 18).  So each
test drives the device the way Linux's virtio_net does (NAPI on receive,
napi_tx on transmit) and checks that nothing waits.  No guest runs."""

from __future__ import annotations

import pytest

from pyvmm.devices.virtio import net
from pyvmm.devices.virtio.device import F_RING_EVENT_IDX
from pyvmm.devices.virtio.net import NET_HDR_SIZE, RX_QUEUE, TX_QUEUE

from .test_virtio_net import QSIZE, RINGS, FakePort, NetDriver, frame
from .virtio_driver import DRIVER_OK


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event: whether moving an index from old to new passed event."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class LinuxLikeDriver(NetDriver):
    """NetDriver that kicks and takes interrupts as Linux does with EVENT_IDX."""

    def set_used_event(self, q: int, value: int) -> None:
        """used_event: 'interrupt me once the used idx passes value'."""
        self.memory.write_u16(RINGS[q][1] + 4 + 2 * QSIZE, value & 0xFFFF)

    def avail_event(self, q: int) -> int:
        return self.memory.read_u16(RINGS[q][2] + 4 + 8 * QSIZE)

    def used_idx(self, q: int) -> int:
        return self.memory.read_u16(RINGS[q][2] + 2)

    def enable_callbacks(self, q: int) -> None:
        """virtqueue_enable_cb_prepare: an interrupt for the next used entry."""
        self.set_used_event(q, self.used_idx(q))

    def disable_callbacks(self, q: int) -> None:
        """virtqueue_disable_cb with EVENT_IDX: used_event 0 (Linux's own 'hack')."""
        self.set_used_event(q, 0)

    def post_rx_as_linux(self, size: int) -> bool:
        """Posts one receive buffer and kicks only if avail_event asks; True if it kicked."""
        old = self.avail[RX_QUEUE]
        self.post_rx(size, kick=False)
        kick = need_event(self.avail_event(RX_QUEUE), self.avail[RX_QUEUE], old)
        if kick:
            self.kick(RX_QUEUE)
        return kick

    def transmit_as_linux(self, data: bytes) -> bool:
        """One TX chain, kicked only if avail_event asks; True if it kicked."""
        old = self.avail[TX_QUEUE]
        a, n = self.buffer(net.NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + data)
        self.chain(TX_QUEUE, [(a, n, False)], kick=False)
        kick = need_event(self.avail_event(TX_QUEUE), self.avail[TX_QUEUE], old)
        if kick:
            self.kick(TX_QUEUE)
        return kick

    def interrupts(self) -> int:
        """Queue interrupts since the last call (INTx: raised lines, then the ISR read lowers it)."""
        raised = sum(1 for _, level in self.levels if level)
        self.levels.clear()
        if raised:
            assert self.read_isr() & 1
        return raised


def driver(merge: bool = False) -> LinuxLikeDriver:
    d = LinuxLikeDriver(FakePort())
    features = d.offered() if merge else d.offered() & ~net.F_MRG_RXBUF
    assert features & F_RING_EVENT_IDX
    assert d.init(features) & DRIVER_OK
    return d


def test_a_received_frame_interrupts_at_once_when_used_event_asks():
    d = driver()
    for _ in range(4):
        d.post_rx_as_linux(1526)
    d.interrupts()
    d.enable_callbacks(RX_QUEUE)            # NAPI idle: wants to hear of the next frame
    d.port.inject(frame(1514, 1))
    assert d.used_idx(RX_QUEUE) == 1 and d.interrupts() == 1
    d.disable_callbacks(RX_QUEUE)           # NAPI polling: no interrupts wanted
    d.port.inject(frame(1514, 2))
    assert d.used_idx(RX_QUEUE) == 2 and d.interrupts() == 0
    d.enable_callbacks(RX_QUEUE)            # poll done, callbacks back on
    d.port.inject(frame(1514, 3))
    assert d.used_idx(RX_QUEUE) == 3 and d.interrupts() == 1


def test_a_transmitted_frame_interrupts_when_used_event_asks():
    """napi_tx: the sender frees its skb (and TCP's small-queue budget) only
    when the TX interrupt comes; used_event says after how many."""
    d = driver()
    d.interrupts()
    d.enable_callbacks(TX_QUEUE)
    assert d.transmit_as_linux(frame(1514, 4))       # the first TX always kicks
    assert len(d.port.sent) == 1 and d.interrupts() == 1
    d.set_used_event(TX_QUEUE, d.used_idx(TX_QUEUE) + 1)   # skip one, then tell me
    assert d.transmit_as_linux(frame(200, 5))
    assert d.interrupts() == 0
    assert d.transmit_as_linux(frame(200, 6))
    assert len(d.port.sent) == 3 and d.interrupts() == 1


@pytest.mark.parametrize("merge", [False, True], ids=["one-chain", "mrg-rxbuf"])
def test_a_held_frame_goes_in_on_the_kick_avail_event_asks_for(merge):
    """Frames that found no buffer wait in the device; the buffers Linux
    posts next must draw a kick (avail_event), or the frames wait for some
    unrelated later kick."""
    d = driver(merge)
    d.enable_callbacks(RX_QUEUE)
    d.port.inject(frame(1514, 7))                     # no buffer posted yet
    assert d.used_idx(RX_QUEUE) == 0 and len(d.device.backlog) == 1
    d.interrupts()
    size = 1024 if merge else 1526                    # with MRG_RXBUF two buffers make one frame
    kicked = [d.post_rx_as_linux(size) for _ in range(2 if merge else 1)]
    assert kicked[-1], "the buffer that completes the room for the held frame drew no kick"
    assert not d.device.backlog and d.used_idx(RX_QUEUE) == (2 if merge else 1)
    assert d.interrupts() == 1
    pieces = [b"".join(d.memory.read(a, n) for a, n in d.rx_posted[head])[:written]
              for head, written in d.used_of(RX_QUEUE)]
    assert b"".join(pieces)[NET_HDR_SIZE:] == frame(1514, 7)
