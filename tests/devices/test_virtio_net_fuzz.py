"""Hostile drivers against virtio-net: random descriptor tables and rings
(tests/devices/test_virtio_fuzz.py's generator) on the transmit and the
receive queue, half the receive rounds with MRG_RXBUF, half the transmit
rounds with CSUM and HOST_TSO4/6 (random virtio_net_hdrs then ask for
checksums and segmentation; test_virtio_net_tso.py aims nearer).  Only a
QueueError may leave the device model, every frame it passes on is a whole
frame of sane length, and the time bound catches a hang.  PYVMM_VIRTIO_FUZZ
sets the count as there."""

from __future__ import annotations

import random
import time

from pyvmm.devices.virtio.net import F_CSUM, F_HOST_TSO4, F_HOST_TSO6, F_MRG_RXBUF, RX_BACKLOG, VirtioNet
from pyvmm.devices.virtio.queue import QueueError, VirtQueue
from pyvmm.memory import GuestMemory
from pyvmm.net.port import MAX_FRAME

from .test_virtio_fuzz import AVAIL_AT, DESC_AT, INPUTS, RAM, SIZE, USED_AT, check_used, scribble
from .test_virtio_net import FakePort


def test_random_queues_only_ever_give_queue_errors():
    r = random.Random(1601)
    memory = GuestMemory(RAM)
    port = FakePort()
    dev = VirtioNet(memory, port, bytes.fromhex("525400000001"))
    queues: list[VirtQueue | None] = [None, None]
    errors = 0
    start = time.monotonic()
    for i in range(INPUTS):
        k = i & 1                                   # 0: RX, 1: TX
        if queues[k] is None:
            queues[k] = VirtQueue(memory, SIZE, DESC_AT, AVAIL_AT, USED_AT,
                                  event_idx=r.random() < 0.5, indirect=r.random() < 0.7)
        vq = queues[k]
        scribble(r, memory, vq, i)
        if k == 0:
            for _ in range(r.randrange(4)):
                if len(dev.backlog) < RX_BACKLOG:
                    dev.backlog.append(r.randbytes(r.choice((14, 60, 1514, 9000))))
        before = vq.used_idx
        dev.acked = F_MRG_RXBUF if i & 2 else 0      # every other RX round spreads frames over chains
        if i & 2:
            dev.acked |= F_CSUM | F_HOST_TSO4 | F_HOST_TSO6
        try:
            dev.process(k, vq)
        except QueueError:
            errors += 1
            queues[k] = None
        check_used(vq, before)
        vq.should_notify()
    elapsed = time.monotonic() - start
    assert errors and errors < INPUTS
    assert port.sent and all(14 <= len(f) <= MAX_FRAME for f in port.sent)
    assert dev.rx_frames and dev.tx_frames == len(port.sent)
    assert elapsed < max(60.0, INPUTS / 200), f"{INPUTS} inputs took {elapsed:.1f} s"
