"""virtio-net's TCP segmentation offload (HOST_TSO4/HOST_TSO6, virtio 1.2
5.1.6.2), driven from the host side (test_virtio_net.NetDriver): a TCP
super-frame of up to 64 KiB leaves as gso_size-sized frames whose
headers and checksums are checked here field by field, the checksums with
RFC 1071's word loop (test_virtio_net_features.rfc1071), not the device's
code; a header that does not describe its frame drops the frame, counted,
without a protocol error."""

from __future__ import annotations

import random
import struct

import pytest

from pyvmm.devices.virtio import net
from pyvmm.devices.virtio.device import F_VERSION_1
from pyvmm.devices.virtio.net import NET_HDR
from pyvmm.net.port import MAX_FRAME

from .test_virtio_net import MAC, FakePort, NetDriver
from .test_virtio_net_features import HOST_MAC, rfc1071
from .virtio_driver import BUFFERS_AT, DRIVER_OK, NEEDS_RESET

TCPV4, TCPV6, UDP, ECN = 1, 4, 3, 0x80
NEEDS_CSUM = 1
ACK, PSH, FIN = 0x10, 0x08, 0x01
SRC4, DST4 = bytes((10, 0, 2, 15)), bytes((10, 0, 2, 16))
SRC6, DST6 = b"\xfd" + bytes(14) + b"\x0f", b"\xfd" + bytes(14) + b"\x10"
SEQ = 0xFFFFF000                 # wraps inside the super-frame
IP_ID = 0xFFFE                   # wraps too
TCP_LEN = 32                     # 20 bytes and a timestamp option, as Linux sends


def tcp_header(flags: int, proto_len: int, pseudo_src: bytes, pseudo_dst: bytes, v6: bool) -> bytes:
    """A TCP header whose checksum field holds the pseudo-header sum (not
    inverted), what Linux leaves for NEEDS_CSUM."""
    pseudo = (pseudo_src + pseudo_dst + struct.pack(">IxxxB", proto_len, 6) if v6 else
              pseudo_src + pseudo_dst + struct.pack(">BBH", 0, 6, proto_len))
    partial = ~rfc1071(pseudo) & 0xFFFF
    return (struct.pack(">HHIIBBHHH", 40000, 5201, SEQ, 0x01020304, (TCP_LEN // 4) << 4, flags, 501,
                        partial, 0) + b"\x01\x01\x08\x0a" + struct.pack(">II", 7, 9))


def super_v4(payload: bytes, flags: int = ACK | PSH, proto: int = 6, frag: int = 0x4000,
             tag: bytes = b"") -> bytes:
    tcp = tcp_header(flags, TCP_LEN + len(payload), SRC4, DST4, False)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), IP_ID, frag, 64, proto, 0,
                     SRC4, DST4)
    ip = ip[:10] + struct.pack(">H", rfc1071(ip)) + ip[12:]
    return HOST_MAC + MAC + tag + b"\x08\x00" + ip + tcp + payload


def super_v6(payload: bytes, flags: int = ACK | PSH) -> bytes:
    tcp = tcp_header(flags, TCP_LEN + len(payload), SRC6, DST6, True)
    ip = struct.pack(">IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64, SRC6, DST6)
    return HOST_MAC + MAC + b"\x86\xdd" + ip + tcp + payload


def pattern(n: int) -> bytes:
    return bytes((i * 13 + i // 256) & 0xFF for i in range(n))


def driver(features: int | None = None) -> NetDriver:
    d = NetDriver(FakePort())
    assert d.init(features) & DRIVER_OK
    return d


def send(d: NetDriver, frame: bytes, gso: int, gso_size: int, *, flags: int = NEEDS_CSUM,
         hdr_len: int | None = None, csum: tuple[int, int] | None = None) -> None:
    """One TX chain: the header in its own buffer, the frame in two (as
    Linux hands over a linear head and page fragments)."""
    at = 14 + (4 if frame[12:14] == b"\x81\x00" else 0)
    l4 = at + (20 if frame[at] >> 4 == 4 else 40)
    start, offset = csum or (l4, 16)
    header = NET_HDR.pack(flags, gso, l4 + TCP_LEN if hdr_len is None else hdr_len, gso_size, start, offset, 0)
    d.buf_cursor = BUFFERS_AT             # the device reads each chain before the next is made
    h = d.buffer(header)
    cut = min(len(frame), 200)
    a, b = d.buffer(frame[:cut]), d.buffer(frame[cut:] or b"\0")
    parts = [(*h, False), (*a, False)] + ([(*b, False)] if len(frame) > cut else [])
    d.chain(1, parts)


def check_segments(out: list[bytes], original: bytes, payload: bytes, mss: int, v6: bool, flags: int,
                   tag: bytes = b"") -> None:
    """Each field of each segment, as the kernel's own GSO would write it."""
    at = 14 + len(tag)
    ihl = 40 if v6 else 20
    l4 = at + ihl
    assert len(out) == -(-len(payload) // mss)
    got = b""
    for i, seg in enumerate(out):
        chunk = payload[i * mss:(i + 1) * mss]
        last = i == len(out) - 1
        assert len(seg) == l4 + TCP_LEN + len(chunk)
        assert seg[:at] == original[:at]                          # Ethernet header and tag
        ip, tcp = seg[at:l4], seg[l4:l4 + TCP_LEN]
        if v6:
            assert struct.unpack_from(">H", ip, 4)[0] == TCP_LEN + len(chunk)
            assert ip[:4] + ip[6:] == original[at:at + 4] + original[at + 6:l4]
            pseudo = SRC6 + DST6 + struct.pack(">IxxxB", TCP_LEN + len(chunk), 6)
        else:
            total, ident, frag = struct.unpack_from(">HHH", ip, 2)
            assert (total, ident, frag) == (20 + TCP_LEN + len(chunk), (IP_ID + i) & 0xFFFF, 0x4000)
            assert rfc1071(ip) == 0                               # header checksum
            pseudo = SRC4 + DST4 + struct.pack(">BBH", 0, 6, TCP_LEN + len(chunk))
        seq, ack = struct.unpack_from(">II", tcp, 4)
        assert seq == (SEQ + i * mss) & 0xFFFFFFFF and ack == 0x01020304
        want = flags if last else flags & ~(FIN | PSH)
        assert tcp[13] == want, (i, tcp[13])
        assert tcp[20:] == original[l4 + 20:l4 + TCP_LEN]       # options repeated
        assert rfc1071(pseudo + tcp + seg[l4 + TCP_LEN:]) == 0    # TCP checksum
        got += seg[l4 + TCP_LEN:]
    assert got == payload


def test_tso_is_offered():
    offered = NetDriver(FakePort()).offered()
    assert offered & net.F_HOST_TSO4 == 1 << 11 and offered & net.F_HOST_TSO6 == 1 << 12
    assert offered & net.F_CSUM                                   # TSO needs it
    assert not offered & (1 << 13 | 1 << 14)                      # HOST_ECN, HOST_UFO: not offered


@pytest.mark.parametrize("flags", [ACK | PSH, ACK | PSH | FIN], ids=["psh", "fin"])
def test_a_64k_ipv4_super_frame_leaves_as_mss_segments(flags):
    d = driver()
    payload = pattern(MAX_FRAME - 14 - 20 - TCP_LEN)              # as much as one chain may carry
    frame = super_v4(payload, flags)
    send(d, frame, TCPV4, 1448)
    check_segments(d.port.sent, frame, payload, 1448, False, flags)
    assert len(d.port.sent) == 46 and all(len(s) <= 1514 for s in d.port.sent)
    assert d.device.tx_frames == 46 and d.device.tx_dropped == 0
    assert [n for _, n in d.used_of(1)] == [0] and not d.status & NEEDS_RESET


def test_a_64k_ipv6_super_frame_leaves_as_mss_segments():
    d = driver()
    payload = pattern(MAX_FRAME - 14 - 40 - TCP_LEN)              # as much as one chain may carry
    frame = super_v6(payload, ACK | PSH | FIN)
    send(d, frame, TCPV6, 1428)
    check_segments(d.port.sent, frame, payload, 1428, True, ACK | PSH | FIN)
    assert len(d.port.sent) == 46 and d.device.tx_frames == 46 and d.device.tx_dropped == 0


def test_gso_size_sets_the_segment_size_and_a_vlan_tag_is_kept():
    d = driver()
    tag = b"\x81\x00\x00\x07"
    payload = pattern(10000)
    frame = super_v4(payload, tag=tag)
    send(d, frame, TCPV4, 536)
    check_segments(d.port.sent, frame, payload, 536, False, ACK | PSH, tag)
    assert len(d.port.sent) == 19


def test_a_super_frame_that_fits_one_segment_leaves_whole_with_its_checksum():
    d = driver()
    payload = pattern(1000)
    frame = super_v4(payload)
    send(d, frame, TCPV4, 1448)
    check_segments(d.port.sent, frame, payload, 1448, False, ACK | PSH)


def test_malformed_headers_are_dropped_and_counted():
    d = driver()
    payload = pattern(5000)
    good = super_v4(payload)
    l4 = 14 + 20
    bad_total = bytearray(good)
    struct.pack_into(">H", bad_total, 16, len(good))             # IPv4 total length past the frame
    bad_offset = bytearray(good)
    bad_offset[l4 + 12] = 4 << 4                                 # TCP data offset below 5 words
    cases = [
        (good, TCPV4, 0, {}),                                    # gso_size 0
        (good, TCPV4, 1, {}),                                    # one byte a segment: 5000 frames
        (good, TCPV4, 1448, {"hdr_len": len(good) + 1}),         # hdr_len beyond the frame
        (good, TCPV4, 1448, {"csum": (len(good) + 10, 16)}),     # csum_start outside the frame
        (good, TCPV4, 1448, {"csum": (14, 10)}),                 # the IP header's checksum, not TCP's
        (good, TCPV4, 1448, {"csum": (l4, 6)}),                  # a checksum offset other than TCP's
        (good, TCPV4 | ECN, 1448, {}),                           # ECN without HOST_ECN
        (good, TCPV6 | ECN, 1448, {}),
        (good, UDP, 1448, {}),                                   # UFO was never offered
        (good, 5, 1448, {}),                                     # nor USO
        (good, 0x42, 1448, {}),                                  # no such type
        (good, TCPV6, 1448, {}),                                 # an IPv4 frame called TCPV6
        (super_v6(payload), TCPV4, 1448, {}),                    # and an IPv6 one called TCPV4
        (super_v4(payload, proto=17), TCPV4, 1448, {}),          # UDP inside, gso TCPV4
        (super_v4(payload, frag=0x2000), TCPV4, 1448, {}),       # an IPv4 fragment
        (bytes(bad_total), TCPV4, 1448, {}),
        (bytes(bad_offset), TCPV4, 1448, {}),
        (good[:l4 + 10], TCPV4, 1448, {}),                       # cut inside the TCP header
        (HOST_MAC + MAC + b"\x08\x06" + bytes(28), TCPV4, 1448, {}),   # ARP
        (super_v4(pattern(MAX_FRAME - 14 - 20 - TCP_LEN + 1)), TCPV4, 1448, {}),   # over 64 KiB + header
    ]
    for frame, gso, size, extra in cases:
        send(d, frame, gso, size, **extra)
    assert d.port.sent == [] and d.device.tx_dropped == len(cases) and d.device.tx_frames == 0
    assert [n for _, n in d.used_of(1)] == [0] * len(cases)      # every chain came back
    assert not d.status & NEEDS_RESET                            # the guest's loss, not a protocol error
    send(d, good, TCPV4, 1448)                                   # and the device still works
    check_segments(d.port.sent, good, payload, 1448, False, ACK | PSH)


def test_a_driver_without_tso_is_served_as_before():
    d = driver(F_VERSION_1 | net.F_CSUM | net.F_MAC)
    payload = pattern(3000)
    frame = super_v4(payload)
    send(d, frame, TCPV4, 1448)                                  # TSO4 not acked: dropped
    assert d.port.sent == [] and d.device.tx_dropped == 1
    plain = super_v4(pattern(1000))
    send(d, plain, 0, 0)                                         # an ordinary frame with NEEDS_CSUM
    check_segments(d.port.sent, plain, pattern(1000), 1448, False, ACK | PSH)
    d4 = driver(d4_features := F_VERSION_1 | net.F_CSUM | net.F_HOST_TSO4)
    assert d4.device.acked == d4_features
    send(d4, super_v6(payload), TCPV6, 1428)                     # TSO6 not acked: dropped
    send(d4, frame, TCPV4, 1448)
    assert d4.device.tx_dropped == 1 and len(d4.port.sent) == 3


def test_hostile_tso_headers_never_crash():
    """Random header fields and random bytes scribbled over the headers of
    good super-frames: every frame out is sane, every chain comes back."""
    r = random.Random(1811)
    d = driver()
    payloads = [pattern(n) for n in (100, 3000, 20000)]
    chains = cut = 0
    for _ in range(400):
        payload = r.choice(payloads)
        frame = bytearray(super_v4(payload) if r.random() < 0.5 else super_v6(payload))
        for _ in range(r.randrange(4)):
            frame[r.randrange(14, 14 + 40 + TCP_LEN)] = r.randrange(256)
        gso = r.choice((TCPV4, TCPV6, TCPV4 | ECN, UDP, r.randrange(256)))
        size = r.choice((0, 1, 47, 48, 536, 1448, r.randrange(65536)))
        csum = r.choice((None, (r.randrange(65536), r.randrange(65536)), (r.randrange(100), 16)))
        hdr_len = r.choice((None, r.randrange(65536)))
        sent = len(d.port.sent)
        send(d, bytes(frame), gso, size, flags=r.randrange(256), hdr_len=hdr_len, csum=csum)
        chains += 1
        for seg in d.port.sent[sent:]:
            assert 14 <= len(seg) <= len(frame)
        assert len(d.port.sent) - sent <= len(payload) // 48 + 1
        cut += len(d.port.sent) - sent > 1
        d.port.sent.clear()
    assert len(d.used_of(1)) == chains and not d.status & NEEDS_RESET
    assert cut and d.device.tx_dropped                           # some were segmented, some dropped


def test_under_ft_the_segments_are_the_held_frames():
    """FT holds a NIC's frames out until the backup's ack (ft/virtio.py):
    the items it holds, counts and releases are the wire frames."""
    from pyvmm.ft.virtio import PrimaryNet
    d = driver()
    nic = PrimaryNet("virtio_net0", d.device, lambda member, frame: None)
    nic.commit.pos = (10, 10)
    payload = pattern(20000)
    frame = super_v6(payload)
    send(d, frame, TCPV6, 1428)
    assert d.port.sent == [] and nic.commit.count == 15
    nic.commit.acknowledged((10, 10))
    check_segments(d.port.sent, frame, payload, 1428, True, ACK | PSH)
