"""virtio-net's CSUM, GUEST_CSUM, CTRL_VQ and GUEST_ANNOUNCE, driven from
the host side (test_virtio_net.NetDriver).  Checksums are checked against
RFC 1071's word-by-word loop, written here independently of the device's
big-integer reduction (net_offload.py)."""

from __future__ import annotations

import os
import struct

import pytest

from pyvmm.devices.virtio import net
from pyvmm.devices.virtio.device import F_VERSION_1
from pyvmm.devices.virtio.net import NET_HDR, NET_HDR_SIZE
from pyvmm.devices.virtio.net_offload import complete_checksum, l4_checksum_ok, ones_complement_sum

from .test_virtio_net import MAC, FakePort, NetDriver
from .virtio_driver import DRIVER_OK

HOST_MAC = bytes.fromhex("020000000001")


def rfc1071(data: bytes) -> int:
    """The Internet checksum, the slow obvious way."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_frame(proto: int, payload: bytes, *, good: bool = True, partial: bool = False) -> tuple[bytes, int, int]:
    """An Ethernet/IPv4/TCP-or-UDP frame; with `partial`, the L4 checksum
    field holds only the pseudo-header sum, as Linux leaves it for CSUM.
    Returns (frame, csum_start, csum_offset)."""
    src, dst = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])
    if proto == 6:
        l4 = struct.pack(">HHIIBBHHH", 40000, 5001, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
        field = 16
    else:
        l4 = struct.pack(">HHHH", 40000, 5001, 8 + len(payload), 0) + payload
        field = 6
    pseudo = src + dst + struct.pack(">BBH", 0, proto, len(l4))
    if partial:
        value = ~rfc1071(pseudo) & 0xFFFF          # the folded pseudo-header sum, not inverted
    else:
        value = rfc1071(pseudo + l4) or (0xFFFF if proto == 17 else 0)
        if not good:
            value ^= 0x0101
    l4 = l4[:field] + struct.pack(">H", value) + l4[field + 2:]
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0, src, dst)
    ip = ip[:10] + struct.pack(">H", rfc1071(ip)) + ip[12:]
    eth = HOST_MAC + MAC + b"\x08\x00"
    return eth + ip + l4, 14 + 20, field


@pytest.mark.parametrize("n", [0, 1, 2, 3, 61, 1500, 1501])
def test_ones_complement_sum_matches_rfc1071(n):
    data = os.urandom(n)
    assert ~ones_complement_sum(data) & 0xFFFF == rfc1071(data) or (ones_complement_sum(data) == 0xFFFF
                                                                   and rfc1071(data) == 0)


@pytest.mark.parametrize("proto", [6, 17])
def test_complete_checksum_gives_what_rfc1071_gives(proto):
    for size in (0, 1, 7, 1400, 1445):
        payload = os.urandom(size)
        partial, start, offset = ipv4_frame(proto, payload, partial=True)
        whole = bytearray(partial)
        assert complete_checksum(whole, start, offset)
        full, _, _ = ipv4_frame(proto, payload)
        assert bytes(whole) == full
        assert l4_checksum_ok(bytes(whole))
    assert not complete_checksum(bytearray(60), 59, 0)       # field past the end
    assert not complete_checksum(bytearray(60), 60, 0)


def test_l4_checksum_ok_only_for_good_tcp_and_udp():
    payload = os.urandom(300)
    assert l4_checksum_ok(ipv4_frame(6, payload)[0]) and l4_checksum_ok(ipv4_frame(17, payload)[0])
    assert not l4_checksum_ok(ipv4_frame(6, payload, good=False)[0])
    assert not l4_checksum_ok(ipv4_frame(17, payload, good=False)[0])
    arp = b"\xff" * 6 + MAC + b"\x08\x06" + bytes(28)
    assert not l4_checksum_ok(arp)
    truncated = ipv4_frame(6, payload)[0][:-10]                # IP total length past the frame
    assert not l4_checksum_ok(truncated)
    assert not l4_checksum_ok(b"")


def drv_with(features: int) -> NetDriver:
    d = NetDriver(FakePort())
    assert d.init(features=features) & DRIVER_OK
    return d


def send_partial(d: NetDriver, frame: bytes, start: int, offset: int, flags: int = 1, gso: int = 0) -> None:
    a, n = d.buffer(NET_HDR.pack(flags, gso, 0, 0, start, offset, 0) + frame)
    d.chain(1, [(a, n, False)])


def test_offered_features():
    offered = NetDriver(FakePort()).offered()
    for bit in (net.F_CSUM, net.F_GUEST_CSUM, net.F_CTRL_VQ, net.F_GUEST_ANNOUNCE, net.F_STATUS, net.F_MAC,
                net.F_MRG_RXBUF):
        assert offered & bit


def test_tx_needs_csum_is_completed_with_csum():
    d = drv_with(F_VERSION_1 | net.F_CSUM)
    for proto in (6, 17):
        partial, start, offset = ipv4_frame(proto, os.urandom(1000), partial=True)
        send_partial(d, partial, start, offset)
        assert d.port.sent[-1] != partial and l4_checksum_ok(d.port.sent[-1])
    send_partial(d, partial, 2000, 6)                          # offsets outside the frame: dropped
    send_partial(d, partial, start, offset, gso=1)             # GSO was never offered: dropped
    assert len(d.port.sent) == 2 and d.device.tx_dropped == 2
    assert not d.status & 0x40                                 # not a protocol error


def test_tx_needs_csum_without_csum_is_sent_as_is():
    d = drv_with(F_VERSION_1)
    partial, start, offset = ipv4_frame(6, b"abc", partial=True)
    send_partial(d, partial, start, offset)
    assert d.port.sent == [partial]


@pytest.mark.parametrize("acked", [True, False])
def test_rx_data_valid_only_for_verified_packets_with_guest_csum(acked):
    d = drv_with(F_VERSION_1 | (net.F_GUEST_CSUM if acked else 0))
    frames = [ipv4_frame(6, os.urandom(500))[0], ipv4_frame(17, os.urandom(500), good=False)[0],
              b"\xff" * 6 + HOST_MAC + b"\x08\x06" + bytes(28)]
    posted = []
    for f in frames:
        posted.append(d.post_rx(1526))
        d.port.inject(f)
    flags = [NET_HDR.unpack(d.memory.read(bufs[0][0], NET_HDR_SIZE))[0] for bufs in posted]
    assert flags == ([net.HDR_F_DATA_VALID, 0, 0] if acked else [0, 0, 0])
    assert d.received() == frames


def control(d: NetDriver, klass: int, command: int, data: bytes = b"") -> int:
    a, n = d.buffer(bytes([klass, command]) + data)
    ack, _ = d.buffer(b"\xee")
    d.chain(2, [(a, n, False), (ack, 1, True)])
    return d.memory.read(ack, 1)[0]


def test_announce_sets_status_interrupts_and_ack_clears_it():
    d = drv_with(F_VERSION_1 | net.F_CTRL_VQ | net.F_GUEST_ANNOUNCE | net.F_STATUS | net.F_MAC)
    d.read_isr()                                               # clear what init raised
    assert struct.unpack_from("<H", d.device_config(8), 6)[0] == net.S_LINK_UP
    assert d.device.announce()
    assert struct.unpack_from("<H", d.device_config(8), 6)[0] == net.S_LINK_UP | net.S_ANNOUNCE
    assert d.read_isr() & 2                                    # a config-change interrupt
    assert control(d, net.CTRL_CLASS_ANNOUNCE, net.CTRL_ANNOUNCE_ACK) == net.CTRL_OK
    assert struct.unpack_from("<H", d.device_config(8), 6)[0] == net.S_LINK_UP
    assert control(d, 0, 0, b"\x01") == net.CTRL_ERR           # RX mode: CTRL_RX was not offered
    assert d.used_of(2)[-1][1] == 1


def test_announce_needs_the_feature_and_control_chains_are_checked():
    d = drv_with(F_VERSION_1 | net.F_CTRL_VQ)
    assert not d.device.announce()
    assert control(d, net.CTRL_CLASS_ANNOUNCE, net.CTRL_ANNOUNCE_ACK) == net.CTRL_ERR
    a, n = d.buffer(b"\x03\x00")
    d.chain(2, [(a, n, False)])                                # no ack byte: a broken chain
    assert d.status & 0x40                                     # NEEDS_RESET


def test_announcing_survives_save_and_restore():
    d = drv_with(F_VERSION_1 | net.F_CTRL_VQ | net.F_GUEST_ANNOUNCE)
    d.device.announce()
    state = d.device.save_fields()
    other = drv_with(F_VERSION_1)
    other.device.restore_fields(state)
    assert other.device.announcing


def test_qmp_announce_self_asks_every_nic_that_took_the_feature():
    import threading
    from types import SimpleNamespace

    from pyvmm.api.catalog import execute
    from pyvmm.api.commands import Target
    from pyvmm.runstate import RunState
    took = drv_with(F_VERSION_1 | net.F_CTRL_VQ | net.F_GUEST_ANNOUNCE)
    did_not = drv_with(F_VERSION_1)
    machine = SimpleNamespace(lock=threading.RLock(), state=RunState.RUNNING, stopping=False,
                              devices={"virtio_net0": took.fn, "virtio_net1": did_not.fn})
    assert execute(Target(machine=machine), "announce-self", {"rounds": 3}) == {}
    assert took.device.announcing and not did_not.device.announcing
