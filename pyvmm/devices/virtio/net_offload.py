"""Checksum and segmentation work virtio-net does for the guest (virtio
1.2, 5.1.6.2 and 5.1.6.4): completing a partial checksum the driver left
(VIRTIO_NET_F_CSUM), checking received TCP/UDP checksums so that the
driver may skip it (VIRTIO_NET_F_GUEST_CSUM, flag DATA_VALID), and cutting
the TCP super-frames of up to 64 KiB that a driver with HOST_TSO4/6 hands
over into frames of gso_size payload bytes (tso_segments).  Under bt a
guest kernel spends some 35,000 instructions on each 1,448-byte segment it
builds; with TSO it builds one header per 64 KiB and the host does the rest.

Under bt and hybrid the guest kernel's checksum loop runs translated, many
times slower than one big-integer reduction here: the Internet checksum of
16-bit big-endian words is the data, read as one integer, modulo 0xFFFF
(2**16 = 1 mod 0xFFFF), so one int.from_bytes and one % do all the adding.
"""

from __future__ import annotations

import struct

from ...net.gso import segment_tcp, tcp_layout

ETH_HEADER = 14
ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN = 0x0800, 0x86DD, 0x8100
PROTO_TCP, PROTO_UDP = 6, 17
IPV6_HEADER = 40
TCP_CSUM_FIELD = 16                 # csum_offset of a TCP header's checksum
# Linux never sends TCP segments of less (net.ipv4.tcp_min_snd_mss); a
# smaller gso_size would only let a guest turn one 64 KiB frame into
# thousands on the network.
MIN_GSO_SIZE = 48


def ones_complement_sum(data: bytes | memoryview) -> int:
    """The folded 16-bit ones' complement sum of `data` (an odd length is
    padded with a zero byte): 0 only for all-zero data."""
    n = int.from_bytes(data, "big") << (8 if len(data) & 1 else 0)
    s = n % 0xFFFF
    return 0xFFFF if s == 0 and n else s


def complete_checksum(frame: bytearray, start: int, offset: int) -> bool:
    """Writes the checksum of frame[start:] at start + offset, as the
    driver asked with NEEDS_CSUM (the field holds the pseudo-header sum
    already).  False when the offsets point outside the frame."""
    at = start + offset
    if start >= len(frame) or at + 2 > len(frame):
        return False
    value = ~ones_complement_sum(memoryview(frame)[start:]) & 0xFFFF
    struct.pack_into(">H", frame, at, value or 0xFFFF)   # 0 and 0xFFFF are the same; UDP reserves 0
    return True


def l4_checksum_ok(frame: bytes) -> bool:
    """Whether `frame` is an unfragmented IPv4 or IPv6 TCP/UDP packet whose
    checksum verifies (a UDP checksum of 0, "none", does not count)."""
    ethertype, at = struct.unpack_from(">H", frame, 12)[0] if len(frame) >= ETH_HEADER else 0, ETH_HEADER
    if ethertype == ETHERTYPE_VLAN and len(frame) >= ETH_HEADER + 4:
        ethertype, at = struct.unpack_from(">H", frame, 16)[0], ETH_HEADER + 4
    if ethertype == ETHERTYPE_IPV4 and len(frame) >= at + 20:
        ihl = (frame[at] & 0xF) * 4
        total, frag, proto = struct.unpack_from(">H2xHxB", frame, at + 2)
        if frame[at] >> 4 != 4 or ihl < 20 or frag & 0x3FFF or total < ihl or at + total > len(frame):
            return False
        pseudo = frame[at + 12:at + 20] + struct.pack(">BBH", 0, proto, total - ihl)
        l4 = frame[at + ihl:at + total]
    elif ethertype == ETHERTYPE_IPV6 and len(frame) >= at + IPV6_HEADER:
        length, proto = struct.unpack_from(">HB", frame, at + 4)
        if at + IPV6_HEADER + length > len(frame):
            return False
        pseudo = frame[at + 8:at + 40] + struct.pack(">IxxxB", length, proto)
        l4 = frame[at + IPV6_HEADER:at + IPV6_HEADER + length]
    else:
        return False
    if proto not in (PROTO_TCP, PROTO_UDP) or len(l4) < (20 if proto == PROTO_TCP else 8):
        return False
    if proto == PROTO_UDP and l4[6:8] == b"\0\0":
        return False
    return ones_complement_sum(bytes(pseudo) + bytes(l4)) == 0xFFFF


def tso_segments(frame: bytes, v6: bool, gso_size: int, hdr_len: int,
                 csum: tuple[int, int] | None) -> list[bytes] | None:
    """The wire frames of a TCP super-frame (gso_type TCPV6 if `v6`, else
    TCPV4), each with at most `gso_size` payload bytes and its checksums
    complete.  `csum` is (csum_start, csum_offset) when the driver set
    NEEDS_CSUM.  None for a header that does not describe the frame: not
    IPv4 (IPv6) TCP with consistent lengths, gso_size below MIN_GSO_SIZE,
    hdr_len past the frame (without GUEST_HDRLEN it is only a hint, so
    only its bound is checked), or a checksum position other than the TCP
    checksum field."""
    layout = tcp_layout(frame)
    if layout is None or layout.v4 == v6 or gso_size < MIN_GSO_SIZE or hdr_len > len(frame):
        return None
    if csum is not None and csum != (layout.tcp, TCP_CSUM_FIELD):
        return None
    if layout.end - layout.payload > gso_size:
        return segment_tcp(frame, gso_size)
    if csum is None:
        return [frame]               # fits one segment: as a frame without GSO
    whole = bytearray(frame)
    complete_checksum(whole, *csum)
    return [bytes(whole)]


__all__ = ["ones_complement_sum", "complete_checksum", "l4_checksum_ok", "tso_segments", "MIN_GSO_SIZE"]
